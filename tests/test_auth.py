"""API keys and rate limits (tagray/serve/auth.py), without Serve: 401 without or with an
unknown key, 403 with the wrong scope, 429 past the burst until the bucket refills; hashes
only in configs."""

from __future__ import annotations

import pytest

from tagray.config import ConfigError, from_dict
from tagray.serve.auth import KeyRing, entry_for, hash_key, new_key, parse_entries
from tagray.serve.errors import RequestError
from tagray.serve.service import ServeConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ring(rate: float = 0.0, burst: int = 3, clock=None) -> tuple[KeyRing, str, str]:
    reader, writer = new_key(), new_key()
    keys = parse_entries([entry_for(reader, ["read"]), entry_for(writer, ["write"])], "test")
    return KeyRing(keys, rate, burst, clock or Clock()), reader, writer


def _status(ring: KeyRing, header: str | None, scope: str = "read") -> int:
    try:
        ring.authorize(header, scope)
        return 200
    except RequestError as e:
        return e.status


def test_keys_scopes_and_their_statuses():
    ring, reader, writer = _ring()
    assert _status(ring, None) == 401
    assert _status(ring, "Basic abc") == 401
    assert _status(ring, "Bearer ") == 401
    assert _status(ring, "Bearer " + reader[:-1] + "x") == 401  # one character off
    assert _status(ring, "Bearer " + reader) == 200
    assert _status(ring, "bearer " + reader) == 200  # the scheme is case-insensitive
    assert _status(ring, "Bearer " + writer) == 403  # a valid key without the read scope
    assert _status(ring, "Bearer " + writer, "write") == 200
    assert _status(ring, "Bearer " + reader, "write") == 403
    with pytest.raises(RequestError) as e:
        ring.authorize(None, "read")
    assert e.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert KeyRing([]).authorize(None, "write") is None  # no keys: open


def test_rate_limit_is_a_token_bucket_per_key():
    clock = Clock()
    ring, reader, writer = _ring(rate=2.0, burst=3, clock=clock)
    assert [_status(ring, "Bearer " + reader) for _ in range(4)] == [200, 200, 200, 429]
    assert _status(ring, "Bearer " + writer, "write") == 200  # another key has its own bucket
    with pytest.raises(RequestError) as e:
        ring.authorize("Bearer " + reader, "read")
    assert e.value.code == "rate_limited" and int(e.value.headers["Retry-After"]) >= 1
    assert reader not in e.value.message  # the key itself is never echoed
    clock.now += 0.5  # refills one token at 2/s
    assert [_status(ring, "Bearer " + reader) for _ in range(2)] == [200, 429]
    clock.now += 10
    assert [_status(ring, "Bearer " + reader) for _ in range(4)] == [200, 200, 200, 429]  # capped at the burst


def test_configs_hold_hashes_never_keys():
    key = new_key()
    assert hash_key(key) in entry_for(key, ["read"]) and key not in entry_for(key, ["read"])
    cfg = from_dict(ServeConfig, {"model": "m", "api_keys": [entry_for(key, ["read", "write"])]}, "args")
    assert parse_entries(cfg.api_keys, "x")[0].scopes == {"read", "write"}
    for bad, words in [([key], "not `SCOPES:sha256"), (["read:sha256:abc"], "not `SCOPES:sha256"),
                       ([f"admin:{hash_key(key)}"], "known: read, write")]:
        with pytest.raises(ConfigError, match=words):
            from_dict(ServeConfig, {"model": "m", "api_keys": bad}, "args")
    with pytest.raises(ConfigError, match="rate_limit"):
        from_dict(ServeConfig, {"model": "m", "rate_limit_per_s": float("inf")}, "args")


def test_keys_from_the_environment_join_the_configs(monkeypatch):
    from tagray.serve.app import keyring_of

    a, b = new_key(), new_key()
    monkeypatch.setenv("TAGRAY_TEST_KEYS", f"{entry_for(a, ['read'])} ;\n{entry_for(b, ['write'])}")
    ring = keyring_of(ServeConfig(model="m", api_keys_env="TAGRAY_TEST_KEYS"))
    assert ring.required and _status(ring, "Bearer " + a) == 200 and _status(ring, "Bearer " + b, "write") == 200
    monkeypatch.delenv("TAGRAY_TEST_KEYS")
    with pytest.raises(ValueError, match=r"require_api_keys is set but no key entries .* \$TAGRAY_TEST_KEYS"):
        keyring_of(ServeConfig(model="m", api_keys_env="TAGRAY_TEST_KEYS", require_api_keys=True))
    assert not keyring_of(ServeConfig(model="m", api_keys_env="TAGRAY_TEST_KEYS")).required  # open by default
    monkeypatch.setenv("TAGRAY_TEST_KEYS", a)  # a plain key in the environment is refused too
    with pytest.raises(ValueError, match=r"\$TAGRAY_TEST_KEYS: entry 1"):
        keyring_of(ServeConfig(model="m", api_keys_env="TAGRAY_TEST_KEYS"))
