"""AI steps (SPEC 13.6) through the real engine, on SQLite and PostgreSQL: the tool loop with
real ``http/request`` tools against a counting local server, checkpoints in the step row,
``ai/embed`` literals used downstream, the step timeout over the whole loop, cancel, and
credentials."""

from __future__ import annotations

import json
import time

import pytest

from actors.children import child_key
from actors.engine import Engine
from mantle import store
from mantle.db import transaction
from mantle.db.connect import connect, is_postgres
from mantle.db.models import StepExecution, WorkflowExecution
from mantle.metrics import Metrics
from tests.actors.conftest import apply, finish, run, steps_of, wait_until
from tests.helpers.database import lock_waiters
from tests.helpers.fake_openai import (EMBEDDINGS, FakeOpenAI, embedding, text,
                                       tool_calls)


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def tool_loop_workflow(fake, target, step_extra: str = "") -> str:
    return apply(f"""
        name: agent
        steps:
          - name: ask
            action: ai/completion
            {step_extra}
            params:
              base_url: "{fake.base_url}"
              model: local-model
              prompt: "Plan the trip"
              tools:
                - name: weather
                  description: Weather at a place
                  input_schema:
                    type: object
                    properties: {{city: {{type: string}}}}
                  action: http/request
                  params: {{url: "{target.url('/weather')}"}}
                - name: book
                  action: http/request
                  input_schema:
                    type: object
                    properties: {{body: {{type: object}}}}
                  params: {{method: POST, url: "{target.url('/book')}"}}
          - name: report
            action: core/log
            depends_on: [ask]
            params: {{message: "{{{{ steps.ask.output.text }}}} ({{{{ steps.ask.output.rounds }}}})"}}
    """)


def test_tool_loop_runs_real_http_tools_once_each_and_checkpoints_every_round(
        engine, fake, http_target):
    http_target.route("/weather", json={"temp": 21})
    http_target.route("/book", json={"booked": True})
    fake.script(tool_calls(("weather", {"city": "Rome"}, "w1"), usage=(10, 2)),
                tool_calls(("book", {"body": {"city": "Rome"}}, "b1"), usage=(20, 3)),
                text("Booked Rome, 21 degrees", usage=(30, 4)))
    tool_loop_workflow(fake, http_target)
    detail = run(engine, "agent")

    assert detail["status"] == "completed", detail
    output = steps_of(detail)["ask"]["output"]
    assert output["text"] == "Booked Rome, 21 degrees" and output["rounds"] == 3
    assert output["usage"] == {"prompt_tokens": 60, "completion_tokens": 9,
                               "total_tokens": 69}
    assert steps_of(detail)["report"]["output"] == {"message": "Booked Rome, 21 degrees (3)"}
    assert http_target.hits("/weather") == 1 and http_target.hits("/book") == 1
    assert http_target.requests("/book")[0].json() == {"city": "Rome"}
    assert http_target.requests("/book")[0].method == "POST"
    last = fake.requests()[-1].json["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in last] == [
        ("user", None), ("assistant", None), ("tool", "w1"), ("assistant", None),
        ("tool", "b1")]
    assert json.loads(last[2]["content"])["json"] == {"temp": 21}
    row = StepExecution.get(StepExecution.step_name == "ask")
    # the last checkpoint, kept with the attempt: the final answer (SPEC 13.6, docs/ai.md)
    assert row.progress["rounds"] == 3 and row.progress["final"]["finish_reason"] == "stop"
    assert [m["role"] for m in row.progress["messages"]][-2:] == ["tool", "assistant"]


def test_engine_metrics_count_ai_tokens_and_requests(engine, fake, http_target):
    fake.script(text("hi", usage=(7, 3)))
    apply(f"""
        name: one-shot
        steps:
          - {{name: ask, action: ai/completion,
             params: {{base_url: "{fake.base_url}", model: tiny, prompt: hello}}}}
    """)
    assert run(engine, "one-shot")["status"] == "completed"
    value = engine.metrics.registry.get_sample_value
    assert value("mantle_ai_tokens_total", {"model": "tiny", "kind": "prompt"}) == 7
    assert value("mantle_ai_requests_total", {"model": "tiny", "status": "200"}) == 1


def test_embed_vectors_are_pgvector_literals_usable_downstream(engine, fake):
    fake.script(embedding([0.25, -1.5], [1, 2], usage=5), path=EMBEDDINGS)
    apply(f"""
        name: embedder
        steps:
          - name: embed
            action: ai/embed
            params: {{base_url: "{fake.base_url}", model: nomic, input: [alpha, beta]}}
          - name: store
            action: core/log
            depends_on: [embed]
            params: {{message: "INSERT ... VALUES ('{{{{ steps.embed.output.vectors[1] }}}}')"}}
    """)
    detail = run(engine, "embedder")
    assert detail["status"] == "completed", detail
    output = steps_of(detail)["embed"]["output"]
    assert output["vectors"] == ["[0.25,-1.5]", "[1.0,2.0]"]
    assert output["count"] == 2 and output["dimensions"] == 2
    assert steps_of(detail)["store"]["output"] == {"message": "INSERT ... VALUES ('[1.0,2.0]')"}


def test_step_timeout_covers_the_whole_loop(engine, fake, http_target):
    http_target.route("/weather", json={"temp": 1})
    fake.script(tool_calls(("weather", {"city": "Oslo"}, "w1")), text("never", hold=True))
    tool_loop_workflow(fake, http_target, step_extra="timeout: 1s")
    started = time.monotonic()
    detail = run(engine, "agent")
    ask = steps_of(detail)["ask"]
    assert (ask["status"], ask["error"]) == ("failed", "step timed out after 1s")
    assert time.monotonic() - started < 5
    assert http_target.hits("/weather") == 1


def test_cancel_aborts_the_model_request_in_flight(engine, fake, http_target):
    fake.script(text("never", hold=True))
    tool_loop_workflow(fake, http_target)
    execution_id = engine.run("agent").execution_id
    fake.wait_for_requests(1, held=True)
    engine.cancel(execution_id, actor="cli")
    detail = finish(engine, execution_id, timeout=5)
    wait_until(lambda: StepExecution.get(StepExecution.step_name == "ask").status
               == "cancelled", timeout=2)
    assert detail["status"] == "cancelled"


@pytest.fixture
def secrets():
    return {"MANTLE_SECRET_LLM": "sk-local-1"}


def test_step_credential_authorizes_the_model_call_and_is_redacted(engine, fake, http_target):
    http_target.route("/weather", echo=True)
    fake.script(tool_calls(("weather", {"city": "x"}, "w1")), text("key sk-local-1 seen"))
    tool_loop_workflow(fake, http_target, step_extra="credential: llm")
    detail = run(engine, "agent")
    assert fake.requests()[0].headers["authorization"] == "Bearer sk-local-1"
    assert steps_of(detail)["ask"]["output"]["text"] == "key ******** seen"
    assert "sk-local-1" not in json.dumps(
        StepExecution.get(StepExecution.step_name == "ask").progress)


@pytest.fixture
def tool_secrets():
    return {"MANTLE_SECRET_LLM": "sk-local-1", "MANTLE_SECRET_WEATHER": "w-key-2"}


def test_tools_never_get_the_step_credential_and_use_their_own(db, tmp_path, fake,
                                                               http_target, tool_secrets):
    """The model provider's key stays with the model call; a tool sends only the credential
    it names itself (SPEC 13.6 tools, 13.1.5 resolution)."""
    engine = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path), env={},
                    secrets=tool_secrets).start()
    try:
        http_target.route("/weather", echo=True)
        http_target.route("/book", echo=True)
        fake.script(tool_calls(("weather", {"city": "x"}, "w1"), ("book", {}, "b1")),
                    text("done"))
        apply(_with_tool_credential(fake, http_target))
        run(engine, "agent")
    finally:
        engine.shutdown(timeout=2)
    assert fake.requests()[0].headers["authorization"] == "Bearer sk-local-1"
    [weather] = http_target.requests("/weather")
    [book] = http_target.requests("/book")
    assert ("Authorization", "Bearer w-key-2") in weather.headers
    assert "authorization" not in {name.lower() for name, _ in book.headers}


def _with_tool_credential(fake, target) -> str:
    return f"""
        name: agent
        steps:
          - name: ask
            action: ai/completion
            credential: llm
            params:
              base_url: "{fake.base_url}"
              model: local-model
              prompt: "Plan the trip"
              tools:
                - name: weather
                  action: http/request
                  credential: weather
                  input_schema:
                    type: object
                    properties: {{city: {{type: string}}}}
                  params: {{url: "{target.url('/weather')}"}}
                - name: book
                  action: http/request
                  params: {{method: POST, url: "{target.url('/book')}"}}
    """


def _apply_example(name: str) -> str:
    from pathlib import Path
    return apply((Path(__file__).resolve().parents[2] / "examples" / name).read_text())


def test_extract_example_runs_against_an_openai_compatible_server(engine, fake):
    fake.script(text('{"name": "Ada Lovelace", "born": 1815, "summary": "Wrote the first '
                     'program."}', usage=(50, 20)))
    fake.script(embedding([0.5, 0.25, 0.125]), path=EMBEDDINGS)
    _apply_example("ai-extract.yaml")
    detail = run(engine, "ai-extract", {"text": "Ada Lovelace, born 1815...",
                                        "base_url": fake.base_url})
    assert detail["status"] == "completed", detail
    assert steps_of(detail)["report"]["output"]["message"] == (
        "Ada Lovelace: Wrote the first program. (3-dimension vector, 70 tokens)")
    assert fake.requests()[0].json["response_format"]["type"] == "json_schema"
    assert fake.requests(EMBEDDINGS)[0].json["input"] == "Wrote the first program."


def test_agent_example_refuses_tool_urls_outside_its_pattern(engine, fake):
    fake.script(tool_calls(("geocode", {"url": "http://127.0.0.1:9/steal"}, "g1")),
                text("I could not look it up."))
    _apply_example("ai-agent.yaml")
    detail = run(engine, "ai-agent", {"base_url": fake.base_url})
    assert detail["status"] == "completed", detail
    tool = fake.requests()[1].json["messages"][-1]
    assert tool["role"] == "tool" and "does not match" in tool["content"]
    assert steps_of(detail)["show"]["output"]["message"] == (
        "I could not look it up. (2 model calls)")


# --- workflow/run tools (SPEC 13.3 children of an AI step's attempt) -------------------------

KID = """
    name: kid
    inputs: {who: {type: string, default: nobody}}
    steps:
      - {name: greet, action: core/log, params: {message: "hi {{ inputs.who }}"}}
"""


def _children(parent_id: str) -> list[WorkflowExecution]:
    return list(WorkflowExecution.select().where(
        WorkflowExecution.parent_execution_id == parent_id)
        .order_by(WorkflowExecution.started_at))


def _status(execution_id: str) -> str:
    return WorkflowExecution.get_by_id(execution_id).status


def _agent_with_workflow_tool(fake, tool: str, workflow: str, step_extra: str = "") -> str:
    return apply(f"""
        name: agent
        steps:
          - name: ask
            action: ai/completion
            {step_extra}
            params:
              base_url: "{fake.base_url}"
              model: local-model
              prompt: "use {tool}"
              tools:
                - name: {tool}
                  description: Run the {workflow} workflow
                  input_schema:
                    type: object
                    properties: {{inputs: {{type: object}}}}
                  action: workflow/run
                  params: {{workflow: {workflow}}}
    """)


def _tool_results(fake) -> list:
    return [json.loads(m["content"]) for m in fake.requests()[-1].json["messages"]
            if m["role"] == "tool"]


def test_a_workflow_run_tool_called_again_in_a_later_round_runs_a_new_child(engine, fake):
    """SPEC 13.6: each tool call runs its action; 13.3: one child per call. Servers reuse
    call ids across rounds (this fake does, as some real ones do): the second round's call,
    with other inputs, must run a child of its own, not be answered with the first
    round's child (found again under a key made of the call id)."""
    apply(KID)
    _agent_with_workflow_tool(fake, "kid", "kid")
    fake.script(tool_calls(("kid", {"inputs": {"who": "ann"}}, "c1")),
                tool_calls(("kid", {"inputs": {"who": "bob"}}, "c1")),
                text("done"))
    detail = run(engine, "agent")
    assert detail["status"] == "completed", detail
    greeted = [r["steps"]["greet"]["output"]["message"] for r in _tool_results(fake)]
    assert greeted == ["hi ann", "hi bob"]
    assert [c.inputs["who"] for c in _children(detail["id"])] == ["ann", "bob"]


SLEEPY_KID = """
    name: sleepy-kid
    steps: [{name: nap, action: core/sleep, params: {duration: %s}}]
"""


def test_a_restart_leaves_a_workflow_run_tools_child_running_for_the_next_owner(
        db, tmp_path, fake):
    """SPEC 13.3: one child per attempt, awaited again after a crash; 10.3/13.7: a restart
    (shutdown deadline) interrupts the attempt but leaves its work to the next owner; 13.6:
    a tool call in flight then is made again, never turned into a failure. The leaving
    node must not cancel the tool's child: the next owner makes the unanswered call again,
    finds that child under its key and answers the model with its result."""
    apply(SLEEPY_KID % "3s")
    _agent_with_workflow_tool(fake, "nap", "sleepy-kid")
    fake.script(tool_calls(("nap", {}, "n1")), text("rested"))
    old = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path), secrets={}).start()
    new = None
    try:
        parent = old.run("agent").execution_id
        [child] = wait_until(lambda: _children(parent))
        wait_until(lambda: _status(child.id) == "running")
        old.shutdown(timeout=0.2)
        new = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path), secrets={},
                     resume_orphans=True).start()
        wait_until(lambda: _status(parent) != "running", timeout=20)
    finally:
        old.shutdown(timeout=1)
        if new is not None:
            new.shutdown(timeout=1)
    results = _tool_results(fake)
    assert [c.status for c in _children(parent)] == ["completed"], results
    assert results and "error" not in results[0], results
    assert _status(parent) == "completed"


def test_a_step_timeout_of_an_ai_step_cancels_the_child_of_its_workflow_run_tool(
        engine, fake):
    """SPEC 13.3: a step timeout of the parent cancels the child, also the child of a
    ``workflow/run`` tool (13.6: a tool may be any action): the write of the attempt's end
    cancels it."""
    apply(SLEEPY_KID % "60s")
    _agent_with_workflow_tool(fake, "nap", "sleepy-kid", step_extra="timeout: 500ms")
    fake.script(tool_calls(("nap", {}, "n1")), text("never"))
    detail = run(engine, "agent")
    assert steps_of(detail)["ask"]["error"] == "step timed out after 500ms", detail
    [child] = _children(detail["id"])
    wait_until(lambda: _status(child.id) == "cancelled", timeout=5,
               message="the child of a timed-out AI step's tool was not cancelled")


def test_a_tool_child_left_running_ends_with_the_ai_attempt_that_completes(engine, fake):
    """SPEC 13.3: no child runs on that no step of its parent awaits. A ``workflow/run``
    tool's child may be left running by its call (one whose creation committed after the
    call gave up on it, its COMMIT in doubt); when the AI attempt completes nothing awaits
    it any more, and the attempt's end must cancel it, as every other end of an attempt
    does. Completion used to skip the attempt's children, and the child ran on under a
    parent that had completed. Here the leftover child is made while the model's last
    answer is held."""
    apply(SLEEPY_KID % "60s")
    _agent_with_workflow_tool(fake, "nap", "sleepy-kid")
    fake.script(text("done without it", hold=True))
    parent = engine.run("agent").execution_id
    fake.wait_for_requests(1, held=True)
    with transaction():
        left = store.create_execution(
            "sleepy-kid", {}, None, None, engine.node.id, "engine",
            child_key(parent, "ask", 1, call="0.0"),
            parent=store.Parent(parent, "ask", 2, attempt=1)).execution["id"]
    fake.release()
    assert finish(engine, parent)["status"] == "completed"
    wait_until(lambda: _status(left) == "cancelled", timeout=5,
               message="a tool's child runs on after its AI attempt completed")


def test_a_workflow_run_tool_that_gave_up_on_its_childs_creation_created_no_child(
        engine, db, migrated_db_url, fake, monkeypatch):
    """SPEC 13.3 (one child per tool call) and 13.6 (a tool's failure is sent to the
    model, which may call again): a ``workflow/run`` tool whose child's creation is held up
    in the database past the call's wait fails the call ("not created in time"); the
    creation must then not commit once the database lets it. It used to: the model was told
    the child was not created while it ran, and a second call ran a second one beside it."""
    if not is_postgres(db):
        pytest.skip("holds a row lock from another session")
    from actors import children

    monkeypatch.setattr(children, "_CREATE_TIMEOUT", 0.3)  # 60 s in production
    apply((SLEEPY_KID % "60s") + "    max_parallel_executions: 5\n")
    _agent_with_workflow_tool(fake, "nap", "sleepy-kid")
    fake.script(tool_calls(("nap", {}, "n1")), text("done without it"))
    holder, watcher = connect(migrated_db_url), connect(migrated_db_url)
    try:
        holder.execute_sql("BEGIN")  # the creation's limit check locks the workflow's row
        holder.execute_sql("SELECT 1 FROM workflows WHERE name = 'sleepy-kid' FOR UPDATE")
        parent = engine.run("agent").execution_id
        wait_until(lambda: lock_waiters(watcher) == 1)  # the creation waits for the row
        # the call gave up: the round's checkpoint (fenced) waits behind the creation
        fence = (parent, WorkflowExecution.get_by_id(parent).epoch)
        wait_until(lambda: any(entry.fence == fence for entry in list(engine.journal._queue)))
    finally:
        holder.execute_sql("ROLLBACK")
        holder.close()
        watcher.close()
    detail = finish(engine, parent)
    assert detail["status"] == "completed", detail
    assert "not created in time" in _tool_results(fake)[0]["error"]
    assert [(c.id, c.status) for c in _children(parent)] == []



def test_a_tools_credential_is_read_again_on_a_fresh_connection_after_one_was_dropped(
        db, tmp_path, fake, http_target, tool_secrets):
    """The step thread reads a tool's credential on its own pooled connection. The server
    dropping it (a restart, a failover, an idle timeout) broke every later read of that
    attempt: the model was told 'credential "weather" cannot be read: database
    unavailable' with the database up."""
    if not is_postgres(db):
        pytest.skip("PostgreSQL: the server drops the step thread's connection")
    engine = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path), env={},
                    secrets=tool_secrets).start()
    try:
        http_target.route("/weather", echo=True)
        fake.script(tool_calls(("weather", {"city": "x"}, "w1")),
                    tool_calls(("weather", {"city": "y"}, "w2"), hold=True), text("done"))
        apply(_with_tool_credential(fake, http_target))
        before = [row[0] for row in db.execute_sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
        result = engine.run("agent", None)
        fake.wait_for_requests(2, held=True)  # the first tool call has read its credential
        dropped = db.execute_sql(  # the connections opened since: the step thread's
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND NOT (pid = ANY(%s))", (before,)).fetchall()
        assert dropped and all(ok for ok, in dropped)
        fake.release()
        assert finish(engine, result.execution_id)["status"] == "completed"
    finally:
        engine.shutdown(timeout=2)
    results = [m["content"] for m in fake.requests()[2].json["messages"] if m["role"] == "tool"]
    assert len(results) == 2 and all('"status":200' in result for result in results), results
    assert len(http_target.requests("/weather")) == 2


def test_an_ai_attempt_holds_no_pooled_connection_after_reading_a_tools_credential(
        db, tmp_path, fake, http_target, tool_secrets):
    """The step thread read a tool's credential on a pooled connection and kept it until the
    attempt ended, through every later model turn (minutes): step threads are many more than
    the pool's places (mantle.db.connect.PG_POOL_SIZE), so two dozen such attempts held the
    whole pool, and the API, the journal back from an outage and the step preparations
    waited for a place (30 s, then failed as an outage)."""
    if not is_postgres(db):
        pytest.skip("PostgreSQL: only its connections come from a pool")
    engine = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path), env={},
                    secrets=tool_secrets).start()
    try:
        http_target.route("/weather", echo=True)
        fake.script(tool_calls(("weather", {"city": "x"}, "w1")), text("done", hold=True))
        apply(_with_tool_credential(fake, http_target))
        result = engine.run("agent", None)
        fake.wait_for_requests(2, held=True)  # the tool has run: the model's next turn
        checked_out = [pooled.connection.info.backend_pid
                       for pooled in list(db._in_use.values())]
        last_statements = [query for query, in db.execute_sql(
            "SELECT query FROM pg_stat_activity WHERE pid = ANY(%s) "
            "AND pid <> pg_backend_pid()", (checked_out,))]
        fake.release()
        assert finish(engine, result.execution_id)["status"] == "completed"
    finally:
        engine.shutdown(timeout=2)
    assert last_statements and not [q for q in last_statements if "credentials" in q], \
        last_statements
