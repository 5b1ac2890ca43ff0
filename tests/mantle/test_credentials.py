"""The encrypted credential store (SPEC 13.2) and a step's credential lookup (13.1.5), on
SQLite and PostgreSQL: what a row holds, what decrypts with which key, and the errors."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mantle import credentials
from mantle.connectors.base import ConnectorError
from mantle.db.models import AuditEvent
from mantle.db.models import Credential as CredentialRow
from mantle.errors import ConfigError, InvalidInput

KEY = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture(autouse=True)
def _unconfigured_key():
    """Each test starts with no process-wide key (as before any composition root ran)."""
    saved = credentials._configured
    credentials._configured = credentials._UNSET
    yield
    credentials._configured = saved


def key(text: str = KEY) -> bytes:
    return credentials.parse_key(text)


def test_a_row_holds_only_ciphertext_nonce_and_a_key_id_never_the_value(db):
    credentials.create("api", "bearer", {"token": "tok-Secret-123"}, key())
    row = CredentialRow.get_by_id("api")
    stored = json.dumps([row.name, row.type, row.ciphertext, row.nonce, row.key_id])
    assert "tok-Secret-123" not in stored and KEY not in stored
    assert len(base64.b64decode(row.nonce)) == 12
    assert row.key_id == credentials.key_id(key()) and len(row.key_id) == 16
    # AES-256-GCM with the name as associated data: the key and the name open it.
    plain = AESGCM(key()).decrypt(base64.b64decode(row.nonce),
                                  base64.b64decode(row.ciphertext), b"api")
    assert json.loads(plain) == {"token": "tok-Secret-123"}


def test_every_value_gets_a_fresh_nonce(db):
    for name in ("one", "two"):
        credentials.create(name, "generic", {"key": "same-value"}, key())
    one, two = CredentialRow.get_by_id("one"), CredentialRow.get_by_id("two")
    assert one.nonce != two.nonce and one.ciphertext != two.ciphertext


def test_a_ciphertext_moved_to_another_name_does_not_decrypt(db):
    credentials.create("real", "generic", {"key": "v"}, key())
    row = CredentialRow.get_by_id("real")
    CredentialRow.insert(name="copy", type=row.type, ciphertext=row.ciphertext, nonce=row.nonce,
                         key_id=row.key_id, created_at=row.created_at,
                         updated_at=row.updated_at).execute()
    assert credentials.read("real", key()).fields == {"key": "v"}
    with pytest.raises(credentials.CannotDecrypt,
                       match='credential "copy" cannot be decrypted with the configured key'):
        credentials.read("copy", key())


def test_typed_fields_keep_the_known_ones_and_name_the_ignored_ones():
    fields, ignored = credentials.typed_fields(
        "openai", {"api_key": "k", "org_id": "o", "colour": "red"})
    assert (fields, ignored) == ({"api_key": "k", "org_id": "o"}, ["colour"])
    assert credentials.typed_fields("openai", {"api_key": "k"}) == ({"api_key": "k"}, [])
    with pytest.raises(InvalidInput) as missing:
        credentials.typed_fields("basic", {"username": "u"})
    assert str(missing.value) == 'field "password" is required for credential type "basic"'
    with pytest.raises(InvalidInput) as unknown:
        credentials.typed_fields("ssh", {})
    assert str(unknown.value) == ('unknown credential type "ssh": must be one of generic, '
                                  "bearer, openai, basic, postgres")


def test_keys_are_64_hex_characters_with_the_specs_errors():
    assert key("AB" * 32) == bytes([0xAB]) * 32
    with pytest.raises(ConfigError) as missing:
        credentials.parse_key("")
    assert str(missing.value) == ("encryption key is not configured — "
                                  "set MANTLE_ENCRYPTION_KEY")
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ConfigError) as malformed:
            credentials.parse_key(bad)
        assert str(malformed.value) == "invalid encryption key: must be 64 hex characters"


def test_create_list_and_delete_are_audited_with_the_name_only(db):
    credentials.create("zeta", "basic", {"username": "u", "password": "p"}, key())
    credentials.create("alpha", "postgres", {"url": "postgresql://x/y"}, key())
    with pytest.raises(credentials.CredentialExists, match='credential "zeta" already exists'):
        credentials.create("zeta", "generic", {"key": "k"}, key())
    assert [(c.name, c.type) for c in credentials.list_credentials()] == \
        [("alpha", "postgres"), ("zeta", "basic")]
    credentials.delete("zeta")
    with pytest.raises(credentials.CredentialNotFound, match='credential "zeta" not found'):
        credentials.delete("zeta")
    events = [(e.actor, e.action, e.resource_type, e.resource_id, e.metadata)
              for e in AuditEvent.select().order_by(AuditEvent.id)]
    assert events == [("cli", "credential.created", "credential", "zeta", {}),
                      ("cli", "credential.created", "credential", "alpha", {}),
                      ("cli", "credential.deleted", "credential", "zeta", {})]


def test_names_follow_the_workflow_name_rule(db):
    for bad in ("Api", "9lives", "my_key", "", "-x"):
        with pytest.raises(InvalidInput, match="must match"):
            credentials.create(bad, "generic", {"key": "k"}, key())
    assert CredentialRow.select().count() == 0


def test_rotation_re_encrypts_everything_and_only_the_new_key_opens_it(db):
    credentials.create("a", "generic", {"key": "one"}, key())
    credentials.create("b", "bearer", {"token": "two"}, key())
    assert credentials.rotate(key(), key(OTHER)) == 2
    assert credentials.read("a", key(OTHER)).fields == {"key": "one"}
    assert credentials.read("b", key(OTHER)).fields == {"token": "two"}
    with pytest.raises(credentials.CannotDecrypt):
        credentials.read("a", key())
    rotated = AuditEvent.select().where(AuditEvent.action == "credential.key_rotated")
    assert sorted(e.resource_id for e in rotated) == ["a", "b"]
    # Running it again with the same new key (the old one no longer opens anything) is fine.
    assert credentials.rotate(key(), key(OTHER)) == 2


def test_rotation_with_the_wrong_old_key_changes_nothing(db):
    credentials.create("a", "generic", {"key": "one"}, key())
    before = CredentialRow.get_by_id("a").ciphertext
    third = "ef" * 32
    with pytest.raises(credentials.CannotDecrypt):
        credentials.rotate(key(third), key(OTHER))
    assert CredentialRow.get_by_id("a").ciphertext == before
    assert credentials.read("a", key()).fields == {"key": "one"}


def test_a_step_credential_comes_from_the_store_before_the_environment(db):
    credentials.configure_key(KEY)
    credentials.create("api", "bearer", {"token": "from-store"}, key())
    environ = {"MANTLE_SECRET_API": "from-env", "MANTLE_SECRET_OTHER-ONE": "x",
               "MANTLE_SECRET_OTHER_ONE": "from-env-too"}
    found = credentials.resolve("api", environ)
    assert (found.type, dict(found.fields)) == ("bearer", {"token": "from-store"})
    fallback = credentials.resolve("other-one", environ)
    assert (fallback.type, dict(fallback.fields)) == ("generic", {"key": "from-env-too"})


def test_a_step_credential_unknown_everywhere_fails_without_retry(db):
    credentials.configure_key(KEY)
    with pytest.raises(ConnectorError) as caught:
        credentials.resolve("ghost-key", {})
    assert caught.value.message == ('credential "ghost-key" not found '
                                    "(set MANTLE_SECRET_GHOST_KEY)")
    assert caught.value.retryable is False


def test_a_stored_credential_the_configured_key_cannot_open_fails_the_step(db):
    credentials.create("api", "bearer", {"token": "t"}, key())
    credentials.configure_key(OTHER)
    with pytest.raises(ConnectorError) as wrong:
        credentials.resolve("api", {"MANTLE_SECRET_API": "never-used"})
    assert wrong.value.message == 'credential "api" cannot be decrypted with the configured key'
    assert wrong.value.retryable is False
    credentials.configure_key("")
    with pytest.raises(ConnectorError) as unset:
        credentials.resolve("api", {})
    assert unset.value.message == ('credential "api" cannot be decrypted: encryption key is '
                                   "not configured — set MANTLE_ENCRYPTION_KEY")


def test_without_a_configured_key_the_environment_key_is_used(db):
    credentials.create("api", "generic", {"key": "k"}, key())
    found = credentials.resolve("api", {"MANTLE_ENCRYPTION_KEY": KEY})
    assert dict(found.fields) == {"key": "k"}
