"""The engine's threads that are not actors: they serve the actors and are owned by
``actors.engine.Engine`` (or the daemon).

- ``journal``: the one writer of a process's engine state, in batched transactions;
- ``timers``: one thread firing every delayed callback;
- ``nodes``: this process's node row and its lease, renewed on a connection of its own;
- ``channel``: cancels announced to the node that owns an execution;
- ``pools``: bounded thread pools for blocking step attempts and expression evaluation;
- ``scheduler``: the cron scheduler of ``mantle serve``.
"""
