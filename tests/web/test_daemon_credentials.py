"""A stored credential used by a real ``mantle serve`` whose key comes from ``mantle.yaml``
(``encryption.key``, SPEC 13.2), on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.helpers.database import bound_database
from tests.web.support import Daemon, apply_yaml, cli

KEY = "3e" * 32


def test_the_daemon_opens_stored_credentials_with_the_key_from_its_config_file(
        migrated_db_url, tmp_path, http_target):
    (tmp_path / "mantle.yaml").write_text(f"encryption:\n  key: '{KEY}'\n")
    created = cli(tmp_path, migrated_db_url, "secrets", "create", "--name", "ai",
                  "--type", "openai", "--field", "api_key=sk-file-key", "--field", "org_id=org-9")
    assert (created.returncode, created.stderr) == (0, ""), created.stderr
    http_target.route("/v1/models", json={"data": []})
    with bound_database(migrated_db_url):
        apply_yaml(f"""
            name: models
            steps:
              - {{name: list, action: http/request, credential: ai,
                 params: {{url: "{http_target.url('/v1/models')}"}}}}
        """)
        daemon = Daemon(tmp_path, migrated_db_url).start()
        try:
            accepted = daemon.post("/api/v1/run/models", {})
            detail = daemon.wait_for_status(accepted.json["execution_id"])
        finally:
            assert daemon.stop() == 0, daemon.output()
    assert detail["status"] == "completed", detail
    request = http_target.requests("/v1/models")[0]
    assert request.header("Authorization") == "Bearer sk-file-key"
    assert request.header("OpenAI-Organization") == "org-9"


def test_serve_refuses_a_malformed_key_or_retention_before_starting(tmp_path):
    url = f"sqlite:///{tmp_path / 'mantle.db'}"
    for env, message in (
            ({"MANTLE_ENCRYPTION_KEY": "abc"}, "invalid encryption key: must be 64 hex characters"),
            ({"MANTLE_RETENTION_AUDIT_DAYS": "soon"},
             'invalid retention.audit_days value "soon": must be a positive whole number of days'),
            ({"MANTLE_RETENTION_INTERVAL": "0s"},
             'invalid retention.interval value "0s": must be a positive duration such as 24h '
             "or 7d")):
        result = cli(tmp_path, url, "serve", "--api-address", "127.0.0.1:0", env=env)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    assert not (tmp_path / "mantle.db").exists()  # refused before touching the database
