"""API key matching (SPEC 7.1; issue 6: keys compared in constant time and stored hashed)."""

from __future__ import annotations

import time

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
