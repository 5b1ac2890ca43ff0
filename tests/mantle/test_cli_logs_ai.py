"""``mantle logs <id>`` shows the token usage of AI steps (SPEC 13.6, docs/cli.md), through the
real command line, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from actors.engine import Engine
from mantle.metrics import Metrics
from tests.helpers.fake_openai import EMBEDDINGS, FakeOpenAI, embedding, error, text, tool_calls
from tests.mantle.test_cli_logs import run_to_end, set_times
from tests.mantle.test_cli_run import Cli, apply


@pytest.fixture
def cli(tmp_path, db, migrated_db_url) -> Cli:
    return Cli(tmp_path, migrated_db_url)


@pytest.fixture
def engine(db, tmp_path):
    started = Engine(db, metrics=Metrics(), plugins_dir=str(tmp_path / "plugins")).start()
    yield started
    started.shutdown(timeout=2)


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def test_logs_show_tokens_under_ai_steps_and_nothing_under_others(cli, engine, fake):
    fake.script(tool_calls(("note", {}, "c1"), usage=(100, 20)),
                text("summary", usage=(150, 30), model="llama3.2:3b"))
    fake.script(embedding([0.1], [0.2], usage=9, model="nomic-embed-text"), path=EMBEDDINGS)
    apply(f"""
        name: ai-steps
        steps:
          - name: summarise
            action: ai/completion
            params:
              base_url: "{fake.base_url}"
              model: llama3.2:3b
              prompt: Summarise
              tools: [{{name: note, action: core/log, params: {{message: noted}}}}]
          - name: embed
            action: ai/embed
            depends_on: [summarise]
            params: {{base_url: "{fake.base_url}", model: nomic-embed-text, input: [a, b]}}
          - {{name: done, action: core/log, depends_on: [embed], params: {{message: ok}}}}
    """)
    execution_id = run_to_end(engine, "ai-steps")
    set_times(execution_id, 0, 3000, summarise=(0, 2000), embed=(2000, 2500),
              done=(2500, 2510))

    result = cli("logs", execution_id)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split("Steps:\n")[1] == (
        "  summarise            completed (2.0s)\n"
        "    tokens: 250 prompt + 50 completion = 300 total (2 rounds, model llama3.2:3b)\n"
        "  embed                completed (500ms)\n"
        "    tokens: 9 prompt = 9 total (2 inputs, model nomic-embed-text)\n"
        "  done                 completed (10ms)\n")


def test_logs_show_tokens_spent_by_a_failed_ai_step(cli, engine, fake):
    fake.script(tool_calls(("note", {}, "c1"), usage=(40, 2)), error(400, "context too long"))
    apply(f"""
        name: ai-fails
        steps:
          - name: ask
            action: ai/completion
            params:
              base_url: "{fake.base_url}"
              model: m
              prompt: go
              tools: [{{name: note, action: core/log, params: {{message: noted}}}}]
    """)
    execution_id = run_to_end(engine, "ai-fails")
    set_times(execution_id, 0, 1000, ask=(0, 900))
    result = cli("logs", execution_id)
    assert result.stdout.split("Steps:\n")[1] == (
        "  ask                  failed (900ms)\n"
        "    error: ai/completion: 400 context too long\n"
        "    tokens: 40 prompt + 2 completion = 42 total (1 round, model m)\n")
