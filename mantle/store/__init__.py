"""The engine's database operations: each function runs inside a journal transaction.

Functions here never open transactions themselves and never raise for expected outcomes
(unknown workflow, limit reached): they return a result the caller inspects, so the journal
can batch them freely. Reads used by the CLI and the REST API live in ``mantle.queries``.

- ``executions``: creation (limits, idempotency), the end, cancel, the queue, snapshots;
- ``steps``: attempt rows and a connector's progress inside an attempt;
- ``ownership``: nodes, leases, fencing epochs, takeover (SPEC 13.7);
- ``versions``: stored workflow versions, parsed once per process;
- ``statements``: the hand-written SQL of the hot writes and the batch scope.
"""

from mantle.store.executions import (CHILD_KEY_PREFIX, MANUAL_TRIGGER, Cancelled, Created,
                                     Parent, Snapshot, cancel_children, cancel_execution,
                                     copy_steps,
                                     create_execution, execution_row, execution_snapshot,
                                     fail_execution, final_results, finish_execution,
                                     mark_hooks_started, promote_queued, queued_workflows,
                                     workflow_of)
from mantle.store.ownership import (STARTING, cancelled_among, check_with_writes,
                                    claim_expired, close_cancelled_steps, close_orphaned_steps,
                                    database_now,
                                    expire_dead_neighbours, expire_node, node_channels,
                                    owned_running, refused_fences, register_node, renew_node)
from mantle.store.statements import batch_scope, storable_text
from mantle.store.steps import write_progress, write_step
from mantle.store.versions import (forget_current_versions, known_current_versions,
                                   model_of, stored_version, version_of)

__all__ = [
    "CHILD_KEY_PREFIX", "MANUAL_TRIGGER", "Cancelled", "Created", "Parent", "Snapshot",
    "cancel_children", "cancel_execution", "copy_steps", "create_execution", "execution_row",
    "execution_snapshot", "fail_execution", "finish_execution", "final_results",
    "mark_hooks_started", "promote_queued", "queued_workflows", "workflow_of",
    "STARTING", "cancelled_among", "check_with_writes", "claim_expired", "close_cancelled_steps",
    "close_orphaned_steps", "database_now", "expire_dead_neighbours", "expire_node",
    "node_channels", "owned_running", "refused_fences", "register_node", "renew_node",
    "batch_scope", "storable_text", "write_progress", "write_step", "model_of",
    "stored_version", "version_of", "known_current_versions", "forget_current_versions",
]
