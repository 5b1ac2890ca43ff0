"""API fuzzing (issue 6): schemathesis against the OpenAPI document that a real ``mantle serve``
serves at ``/api/v1/openapi.json``, on both databases.

- Stateless: every operation with schema-valid (positive) and schema-invalid (negative) data.
  Path parameters are often the names, webhook paths and execution ids that exist, so
  requests also get past the 404s to the code behind them.
- Stateful: scenarios follow the document's links (run -> detail -> cancel -> retry, events,
  step outputs, the workflow's versions and executions; webhook -> the same; cancel ->
  detail), so an execution is read, streamed, cancelled and retried right after the API
  accepted it.

Event streams end at ``execution.finished`` or at their ``timeout``; the fuzzer's requests to
them always carry a short one (``short_streams``), since a stream without one is meant to stay
open.

Each response passes every schemathesis check (no 5xx; status code, content type, headers and
body as documented; negative data refused; a created execution readable at once) except those
``EXCLUDED`` and ``_excluded`` leave out, each with its reason; and the daemon logs no 500.
Failures are collected rather than raised, so the run does not stop at the first one, and a
summary table shows cases, status codes and failures per operation (printed past capture).

CI size: 40 cases per operation and mode, 40 scenarios of up to 8 steps (~30 s for both
databases). Bigger runs: ``MANTLE_FUZZ_EXAMPLES=500 MANTLE_FUZZ_SCENARIOS=200
MANTLE_FUZZ_STEPS=20``. Generation is derandomized (scenarios: fixed seeds) and keeps no
example database, so a run is repeatable and leaves no ``.hypothesis`` directory (whether a
scenario step uses a link's value still draws from schemathesis' own random source).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import Flaky, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (negative_data_rejection,
                                                 positive_data_acceptance)

from mantle.durations import parse_duration
from tests.web.support import Daemon, apply_yaml

EXAMPLES = int(os.environ.get("MANTLE_FUZZ_EXAMPLES", "40"))
SCENARIOS = int(os.environ.get("MANTLE_FUZZ_SCENARIOS", "40"))
STEPS = int(os.environ.get("MANTLE_FUZZ_STEPS", "8"))

WORKFLOWS = ("""
    name: quick
    inputs: {day: {type: string, default: today}}
    steps: [{name: say, action: core/log, params: {message: "{{ inputs.day }}"}}]
""", """
    name: slow
    steps: [{name: nap, action: core/sleep, params: {duration: 20s}}]
""", """
    name: limited
    max_parallel_executions: 1
    on_limit: reject
    steps: [{name: nap, action: core/sleep, params: {duration: 20s}}]
""", """
    name: broken
    steps: [{name: boom, action: core/fail}]
""", """
    name: hooked
    triggers:
      - {type: webhook, path: /hooks/fuzz}
      - {type: webhook, path: /hooks/signed, secret: not-sent-by-the-fuzzer}
    steps:
      - {name: show, action: core/log, params: {message: "{{ trigger.payload }}"}}
      - {name: nap, action: core/sleep, depends_on: [show], params: {duration: 20s}}
""")

# Checks left out, by operation label, with the reason.
EXCLUDED = {
    # The document cannot list a workflow's declared inputs (each workflow has its own), so a
    # schema-valid "inputs" object for an existing workflow is mostly refused with SPEC 7.2's
    # 400 'unknown input "<k>"' / 'input "<k>" must be a <type>'.
    "POST /api/v1/run/{workflow}": [positive_data_acceptance],
    # Likewise a schema-valid "from_step" is rarely a step of the execution's workflow: 400
    # 'step "<s>" not found in workflow "<w>"' (SPEC 13.8, mantle retry's words).
    "POST /api/v1/retry/{execution}": [positive_data_acceptance],
}
# Operations that stream until their ``timeout``, and the one the fuzzer gives them.
STREAMS = ("/api/v1/events", "/api/v1/executions/{id}/events")
STREAM_TIMEOUT = "300ms"

# Path parameters that exist only together (a version of a workflow; the fixture adds a step
# of an execution).
EXISTING_TOGETHER = {
    "/api/v1/workflows/{name}/versions/{version}": {"name": "quick", "version": 1}}

SETTINGS = dict(database=None, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck), report_multiple_bugs=False)


@dataclass
class Tally:
    """Cases, status codes and failures per row of the summary table."""

    cases: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list = field(default_factory=list)
    failed: collections.Counter = field(default_factory=collections.Counter)
    unsatisfiable: set = field(default_factory=set)
    scenarios: int = 0
    # Execution ids a scenario's run or webhook was given, and those a later step then read
    # or cancelled successfully (proof that the links were followed).
    linked: dict = field(default_factory=lambda: collections.defaultdict(set))

    def check(self, row: str, case, response, validate) -> None:
        self.cases[row] += 1
        self.statuses[row][response.status_code] += 1
        try:
            validate()
        except FailureGroup as group:
            for failure in group.exceptions:
                self._fail(row, case, response, f"{failure.title}: {failure.message}")
        except AssertionError as exc:  # a single failure is raised on its own
            self._fail(row, case, response, f"{type(exc).__name__}: {exc}")

    def _fail(self, row: str, case, response, text: str) -> None:
        self.failed[row] += 1
        self.failures.append(f"{row}: {text.strip()}\n    -> {response.status_code} "
                             f"{response.text[:300]}\n    {case.as_curl_command()}")

    def table(self, title: str) -> str:
        lines = [title, f"{'operation':<52} {'mode':<9} {'cases':>5} {'fail':>4}  statuses"]
        for row in sorted(set(self.cases) | self.unsatisfiable):
            label, _, mode = row.rpartition(" ")
            seen = " ".join(f"{code}x{count}"
                            for code, count in sorted(self.statuses[row].items()))
            cases = self.cases[row] if row not in self.unsatisfiable else "-"
            lines.append(f"{label:<52} {mode:<9} {cases:>5} {self.failed[row]:>4}  {seen}")
        lines.append(f"total: {sum(self.cases.values())} cases, {len(self.failures)} failures")
        return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis caches (constants, unicode data) go to a temporary directory, not to a
    ``.hypothesis`` directory in the working tree."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


def _excluded(case) -> list:
    checks = list(EXCLUDED.get(case.operation.label, []))
    if isinstance(case.body, (bytes, str)) and not case.body.strip():
        # "Random bytes" that are only whitespace: not JSON, but the run endpoint reads a
        # blank body as the empty body SPEC 7.2 allows (documented on its requestBody), so
        # 202 is the intended answer, not a negative case accepted by mistake.
        checks.append(negative_data_rejection)
    return checks


@pytest.fixture
def api(bound, tmp_path):
    """(daemon, schema loaded from it, values that exist per path parameter name)."""
    for text in WORKFLOWS:
        apply_yaml(text)
    daemon = Daemon(tmp_path, bound, args=("--shutdown-timeout", "1s")).start()
    try:
        ids = [daemon.post(f"/api/v1/run/{name}", {}).json["execution_id"]
               for name in ("quick", "broken", "slow", "slow", "limited")]
        daemon.wait_for_status(ids[0])
        daemon.wait_for_status(ids[1])
        existing = {"workflow": ["slow", "quick", "broken", "limited", "hooked"],
                    "name": ["quick", "hooked"], "path": ["fuzz", "signed"],
                    "id": ids[:4], "execution": ids[:4], "step": ["say", "boom", "nap"]}
        # Loaded from the fetched JSON rather than with ``from_url``, which would leave out the
        # operation that serves the document itself.
        document = daemon.get("/api/v1/openapi.json").json
        schema = schemathesis.openapi.from_dict(document)
        schema.config.update(base_url=daemon.url, request_timeout=15)
        # Scenarios follow the document's own links only: links schemathesis would infer
        # (list -> item and the like) spread the few steps thin over reads.
        schema.config.phases.stateful.inference.algorithms = []

        @schema.hook("flatmap_path_parameters")
        def sometimes_existing(ctx, path_parameters):
            """One of the generated values replaced by a value that exists, or none.

            Existing values come first: Hypothesis favours early elements, and in scenarios
            a run must be accepted before its links can be followed."""
            if not path_parameters:
                return st.just(path_parameters)
            return st.sampled_from([*(
                {**path_parameters, name: value}
                for name in path_parameters for value in existing.get(name, ())),
                path_parameters])

        @schema.hook("map_query")
        def short_streams(ctx, query):
            """Event streams: a short ``timeout`` unless the case made it invalid."""
            if ctx.operation is None or ctx.operation.path not in STREAMS:
                return query
            if query is None:
                return {"timeout": STREAM_TIMEOUT}
            if isinstance(query, dict) and _stream_timeout_ok(query.get("timeout")):
                return {**query, "timeout": STREAM_TIMEOUT}
            return query

        together = {**EXISTING_TOGETHER, "/api/v1/executions/{id}/steps/{step}/output": {
            "id": ids[0], "step": "say"}}
        yield daemon, schema, together
    finally:
        daemon.stop()


def _stream_timeout_ok(value) -> bool:
    """Absent, or a duration the server accepts (it would stream that long)."""
    if value is None:
        return True
    try:
        return isinstance(value, str) and parse_duration(value) > 0
    except ValueError:
        return False


def _faults(daemon) -> list[str]:
    """Log records of failures inside the daemon: a 500's traceback, a journal write that
    failed (a step failing on odd input is the workflow's business, not a fault)."""
    return [f"{line['msg']}: {str(line.get('error', ''))[-400:]}" for line in list(daemon.lines)
            if line.get("msg") in ("internal server error", "database write failed")]


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def _strategy(operation, mode: GenerationMode, together: dict):
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE and operation.path in together:
        # Only in positive mode: fixing every path parameter could undo what a negative case
        # made invalid (the ``sometimes_existing`` hook replaces one string at a time).
        strategy = st.one_of(strategy, operation.as_strategy(
            generation_mode=mode, path_parameters=together[operation.path]))
    return strategy


def _fuzz_operation(operation, mode: GenerationMode, tally: Tally, together: dict) -> None:
    row = f"{operation.label} {mode.value}"

    @hypothesis.settings(max_examples=EXAMPLES, phases=[Phase.explicit, Phase.generate],
                         **SETTINGS)
    @hypothesis.given(case=_strategy(operation, mode, together))
    def fuzz(case):
        response = case.call()
        tally.check(row, case, response, lambda: case.validate_response(
            response, excluded_checks=_excluded(case)))

    try:
        fuzz()
    except Unsatisfiable:  # nothing in this operation can be made schema-invalid
        tally.unsatisfiable.add(row)


def test_every_operation_answers_as_documented_to_generated_requests(api, backend, capsys):
    daemon, schema, together = api
    tally = Tally()
    operations = _operations(schema)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, tally, together)
    with capsys.disabled():
        print("\n" + tally.table(f"stateless fuzzing [{backend}], {EXAMPLES} per row"))
    assert tally.failures == [], "\n".join(tally.failures[:20])
    assert _faults(daemon) == []
    assert {operation.path for operation in operations} == set(
        daemon.get("/api/v1/openapi.json").json["paths"])


def _follow(linked: dict, case, response) -> None:
    path = case.path_parameters or {}
    label = case.operation.label
    if response.status_code == 202 and "retry" in label:
        if path.get("execution") in linked["accepted"]:
            linked["retried"].add(path["execution"])
        linked["accepted"].add(response.json()["execution_id"])
    elif response.status_code == 202:
        linked["accepted"].add(response.json()["execution_id"])
    elif response.status_code == 200 and path.get("id") in linked["accepted"]:
        linked["streamed" if "events" in label else "read"].add(path["id"])
    elif response.status_code == 200 and path.get("execution") in linked["accepted"]:
        linked["cancelled"].add(path["execution"])


def _state_machine(schema, tally: Tally):
    class Scenario(schema.as_state_machine()):
        def call(self, case, **kwargs):
            try:
                return super().call(case, **kwargs)
            except Exception as exc:  # no answer at all: recorded, then hypothesis sees it too
                tally.failures.append(f"{case.operation.label} stateful: {exc!r}\n    "
                                      f"{case.as_curl_command()}")
                raise

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            row = f"{case.operation.label} stateful"
            _follow(tally.linked, case, response)
            tally.check(row, case, response, lambda: case.validate_response(
                response, additional_checks=additional_checks, excluded_checks=_excluded(case),
                transport_kwargs=kwargs or None, recorder=self.recorder))

        def teardown(self):
            tally.scenarios += 1
            super().teardown()

    return Scenario


def test_scenarios_following_run_detail_cancel_links_answer_as_documented(api, backend,
                                                                         capsys):
    daemon, schema, _ = api
    tally = Tally()
    machine = _state_machine(schema, tally)
    restarts = 0
    while tally.scenarios < SCENARIOS:
        done = tally.scenarios
        # A fixed seed per attempt instead of derandomize: a restart must not replay the
        # attempt before it, which is what ran into the server's changed state.
        hypothesis.seed(restarts)(machine)
        try:
            machine.run(settings=hypothesis.settings(
                max_examples=SCENARIOS - done, stateful_step_count=STEPS,
                phases=[Phase.generate], **{**SETTINGS, "derandomize": False}))
            break
        except Flaky:
            # Hypothesis replayed a prefix of choices and the live server had moved on (an
            # execution finished, a bundle filled differently). Failures are in the tally, so
            # a fresh attempt continues with the scenarios left, as long as attempts progress.
            restarts += 1
            assert tally.scenarios > done, "\n".join(tally.failures[:20]) or "no progress"
    with capsys.disabled():
        print("\n" + tally.table(f"stateful fuzzing [{backend}], {tally.scenarios} scenarios of "
                                 f"up to {STEPS} steps, {restarts} restarts"))
        print("accepted {accepted}, then read {read}, streamed {streamed}, cancelled "
              "{cancelled}, retried {retried}".format(**{
                  key: len(tally.linked[key])
                  for key in ("accepted", "read", "streamed", "cancelled", "retried")}))
    assert tally.failures == [], "\n".join(tally.failures[:20])
    assert _faults(daemon) == []
    # The links were followed: executions accepted in a scenario were read and cancelled in it.
    assert tally.linked["read"] and tally.linked["cancelled"], dict(tally.linked)
    # Every operation on an execution's state is reached through the links (the probes,
    # /metrics and the document itself have no state: the stateless run covers them).
    reached = {row.rpartition(" ")[0] for row in tally.cases}
    assert {"POST /api/v1/run/{workflow}", "GET /api/v1/executions/{id}",
            "POST /api/v1/cancel/{execution}", "POST /api/v1/retry/{execution}",
            "GET /api/v1/executions/{id}/events"} <= reached, reached
