"""API key matching (SPEC 7.1; issue 6: keys compared in constant time and stored hashed)."""

from __future__ import annotations

import threading
import time

import pytest

from mantle.apikeys import ActiveKey, hash_key, match_key

KEYS = 400


def _keys() -> tuple[list[str], list[ActiveKey]]:
    presented = [f"mk_{index:060d}" for index in range(KEYS)]
    return presented, [ActiveKey(f"k{index}", hash_key(key), None)
                       for index, key in enumerate(presented)]


def _fastest(presented: str, keys: list[ActiveKey], rounds: int = 15) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(20):
            match_key(presented, keys)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.alone
def test_matching_a_key_takes_as_long_whichever_key_it_is_or_none():
    """An early exit would make the first key ~400 times faster to find than the last (or a
    wrong key): a timing oracle for which keys exist. Minimum of 15 rounds, so a busy machine
    only slows every case alike."""
    presented, keys = _keys()
    assert match_key(presented[0], keys).name == "k0"
    assert match_key(presented[-1], keys).name == f"k{KEYS - 1}"
    assert match_key("mk_wrong", keys) is None
    first, last, wrong = (_fastest(key, keys) for key in (presented[0], presented[-1], "mk_x"))
    assert max(first, last, wrong) < 2 * min(first, last, wrong), (first, last, wrong)


def test_a_stored_key_is_its_sha256_never_the_key():
    presented, keys = _keys()
    assert all(len(key.key_hash) == 64 and key.key_hash != text
               for key, text in zip(keys, presented))
    assert match_key(keys[0].key_hash, keys) is None


def test_the_api_reads_keys_at_most_once_a_second_and_sees_this_processes_changes_at_once(db):
    """``current_keys`` (what every API request checks): a change made by another process
    (here: a direct UPDATE, as `mantle keys revoke` elsewhere commits) applies within
    KEYS_FRESH_FOR, not on the next request; ``create_key``/``revoke_key`` in this process
    apply at once, and a key's recorded use is remembered by the cached key."""
    import datetime as dt

    from mantle import apikeys
    from mantle.db.models import ApiKey
    from tests.helpers.waiting import wait_until

    assert apikeys.current_keys() == []
    apikeys.create_key("local")
    assert [k.name for k in apikeys.current_keys()] == ["local"]  # at once
    seen = time.monotonic()
    ApiKey.update(revoked_at=dt.datetime(2026, 1, 1)).where(ApiKey.name == "local").execute()
    still = [k.name for k in apikeys.current_keys()]
    if time.monotonic() - seen < apikeys.KEYS_FRESH_FOR:  # read within the window: cached
        assert still == ["local"]
    wait_until(lambda: apikeys.current_keys() == [], timeout=apikeys.KEYS_FRESH_FOR + 5)
    apikeys.create_key("other")
    key = apikeys.current_keys()[0]
    apikeys.touch_key(key)
    assert apikeys.current_keys()[0].last_used_at is not None
    apikeys.revoke_key("other")
    assert apikeys.current_keys() == []  # at once


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_two_revokes_of_one_key_at_once_revoke_and_audit_it_once(db, migrated_db_url):
    """Revoking a revoked key again changes nothing (docs/api.md). Two ``mantle keys
    revoke`` of one key at once (PostgreSQL) both read it not revoked; the one whose UPDATE
    waited for the other's must then find it revoked: one ``apikey.revoked`` row, and the
    time of the first revocation kept."""
    from mantle import apikeys
    from mantle.db.connect import connect
    from mantle.db.models import ApiKey, AuditEvent
    from tests.helpers.database import lock_waiters
    from tests.helpers.waiting import wait_until

    apikeys.create_key("ci")
    holder = connect(migrated_db_url)  # holds the key's row until both revokes wait for it
    holder.execute_sql("BEGIN")
    holder.execute_sql("SELECT 1 FROM api_keys WHERE name = 'ci' FOR UPDATE")
    remaining = []
    def revoke():
        try:
            remaining.append(apikeys.revoke_key("ci"))
        except Exception as exc:
            remaining.append(exc)
            raise

    threads = [threading.Thread(target=revoke) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: lock_waiters(db) == 2, timeout=10)
    finally:
        holder.execute_sql("ROLLBACK")
        for thread in threads:
            thread.join(10)
        holder.close()
    assert remaining == [0, 0]
    revoked = AuditEvent.select().where(AuditEvent.action == "apikey.revoked")
    assert [(row.actor, row.resource_id) for row in revoked] == [("cli", "ci")]
    assert ApiKey.get(ApiKey.name == "ci").revoked_at <= revoked[0].timestamp


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_key_created_meanwhile_under_the_same_name_is_refused_as_existing(db, migrated_db_url):
    """Two ``mantle keys create ci`` at once (PostgreSQL): the one whose INSERT waited for
    the other's commit answers ``API key "ci" already exists`` (SPEC 6.3), not the
    database's unique-constraint error."""
    from mantle import apikeys
    from mantle.db.connect import connect
    from tests.helpers.database import lock_waiters
    from tests.helpers.waiting import wait_until

    other = connect(migrated_db_url)  # the other create, its row not committed yet
    other.execute_sql("BEGIN")
    other.execute_sql("INSERT INTO api_keys (name, prefix, key_hash, created_at, role) "
                      "VALUES ('ci', 'mk_000000', %s, now(), 'admin')", ("0" * 64,))
    outcome = []

    def create():
        try:
            outcome.append(apikeys.create_key("ci"))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=create)
    try:
        thread.start()
        wait_until(lambda: lock_waiters(db) == 1, timeout=10)
    finally:
        other.execute_sql("COMMIT")
        thread.join(10)
        other.close()
    assert [str(error) for error in outcome] == ['API key "ci" already exists']
    assert isinstance(outcome[0], apikeys.KeyExists)
