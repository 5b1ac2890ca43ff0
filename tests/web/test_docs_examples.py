"""The curl examples of the documentation work against a real daemon, as written.

Every ``$ curl ...`` line of README.md and docs/api.md that talks to ``127.0.0.1:8080`` or
``localhost:8080`` runs (with the daemon's real port) after the shell lines just before it
in the same block (``body=...``, ``sig=...``, ``until ...; done``), on the workflows of
``examples/``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from mantle import db as mantle_db
from mantle.cli.context import read_workflow_file
from mantle.db import migrations
from tests.web.support import REPO, Daemon, apply_yaml

_HOST = re.compile(r"(127\.0\.0\.1|localhost):8080")


def _examples(name: str) -> list[list[str]]:
    """Shell snippets ending in a curl call to the local daemon, from ``console`` blocks."""
    text = (REPO / name).read_text()
    snippets = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        setup: list[str] = []
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            command = line[2:].split("  #")[0].strip()
            if command.startswith("curl") and _HOST.search(command):
                snippets.append([*setup, command])
            elif re.match(r"^(\w+=|until )", command):
                setup.append(command)
    return snippets


SNIPPETS = [(name, snippet) for name in ("README.md", "docs/api.md")
            for snippet in _examples(name)]


def test_the_api_docs_have_curl_examples():
    assert any(name == "docs/api.md" for name, _ in SNIPPETS)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("docs")
    url = f"sqlite:///{cwd / 'mantle.db'}"
    database = mantle_db.connect(url)
    migrations.migrate(database)
    mantle_db.bind(database)
    for example in ("hello-world.yaml", "triggers.yaml"):
        apply_yaml(read_workflow_file(str(REPO / "examples" / example)).decode())
    process = Daemon(cwd, url).start()
    yield process
    process.stop()
    mantle_db.close_all(database)
    mantle_db.database_proxy.initialize(None)


@pytest.mark.parametrize("name,snippet", SNIPPETS,
                         ids=[f"{name}:{snippet[-1][:60]}" for name, snippet in SNIPPETS])
def test_a_documented_curl_example_works(name, snippet, daemon):
    for tool in ("curl", "openssl", "jq"):
        if tool in " ".join(snippet) and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    script = "\n".join(_HOST.sub(f"127.0.0.1:{daemon.port}", line) for line in snippet)
    result = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    if "-X POST" in snippet[-1]:
        body = json.loads(result.stdout)
        # The run body (and, for a retry, the retry point and the reused steps).
        assert {"execution_id", "workflow", "version"} <= set(body), result.stdout
        assert set(body) - {"execution_id", "workflow", "version"} <= {"from_step", "reused"}
        detail = daemon.wait_for_status(body["execution_id"])
        # The first step of each example runs locally (later ones may call the internet).
        assert detail["steps"][0]["status"] == "completed", detail
