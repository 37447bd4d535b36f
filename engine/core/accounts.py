"""Accounts: API keys, who owns an order, and per-key rate limits.

An API key is ``oek_<key id>_<secret>``: the key id (16 hex digits, 64 bits) names
the key's record and is not secret; the secret is 32 random bytes (256 bits) in
base64url. Redis keeps only the SHA-256 digest of the whole key, with its name,
creation time and optional limits (``keys.api_key``). A key of 256 random bits needs
no slow, salted hash (that is for passwords a person chose; OWASP's Password Storage
Cheat Sheet): nobody can guess a key from its digest.

Every check runs inside Redis, in the same Lua step as what it guards (the create
script of POST, or ``AUTHORIZE_LUA`` before a read), so a revoked key is refused by
every web process from the next request on, and the rate limit holds across any
number of them. In that step:

1. the key's record: unknown, revoked or a digest that differs (compared in constant
   time) is ``unauthorized``, and counts as one failed attempt of the client's
   address; past the address's budget a failed attempt is ``throttled`` (429) instead,
   and not counted, so the budget drains at its own rate while the guessing goes on.
   A good key passes whatever its address did: one client guessing must not lock out
   the others behind the same address (a NAT, a proxy), and a key's 256 random bits
   make what a guesser learns from a 429 worthless;
2. the key's rate limit, by GCRA (the generic cell rate algorithm of ITU-T I.371, as
   redis-cell and Stripe use it): a rate and a burst, the key's own or the config's.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import re
import secrets
import time
from typing import Any, cast

from redis.asyncio import Redis

from engine.core import keys
from engine.core.config import Config

KEY_PREFIX = "oek_"
# oek_ + 16 hex digits + _ + 43 base64url characters (32 bytes, no padding).
_KEY = re.compile(r"oek_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")
# The owner of the orders made while AUTH=off (no key is asked for).
ANONYMOUS = "anonymous"
# A key's own limits, bounded so that the GCRA arithmetic stays exact in Lua's doubles
# and Redis's integers: calls a second, and calls at once.
MIN_RATE, MAX_RATE = 0.001, 1_000_000.0
MAX_BURST = 1_000_000
# Names: what an operator calls a key in the CLI's list.
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")

# Lua, shared by the create script (engine.core.store) and AUTHORIZE_LUA. Times are
# microseconds on Redis's clock (TIME), so every web process counts on one clock.
# gcra(): may one more call pass now, given the theoretical arrival time stored in
# tat_key? With ``consume`` it is counted. Returns allowed, remaining (calls that
# would still pass now), reset (us until the whole burst is available again) and
# retry (us until one call would pass; 0 when allowed).
# authorize(): steps 1-2 of the module's docstring. Returns {outcome, quota, remaining,
# reset us, retry us, window s}: the rate limit's state for the answer's headers.
AUTHORIZE_FUNCTIONS_LUA = """
local function gcra(tat_key, interval, burst, now, consume)
  local tat = tonumber(redis.call('GET', tat_key) or '0')
  if tat < now then tat = now end
  local allow_at = tat + interval - burst * interval
  if now < allow_at then
    return false, 0, tat - now, allow_at - now
  end
  if consume then
    tat = tat + interval
    redis.call('SET', tat_key, string.format('%d', math.ceil(tat)), 'PX',
               math.ceil((tat - now) / 1000) + 1)
  end
  local remaining = math.floor((now - tat) / interval) + burst
  if remaining < 0 then remaining = 0 end
  return true, remaining, tat - now, 0
end

local function authorize(rec_key, rate_key, fail_key, digest, interval, burst, fail_interval, fail_burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local rec = redis.call('HMGET', rec_key, 'digest', 'revoked_at', 'rate', 'burst')
  -- Compared in constant time: every 32-bit piece of the hex digests, whatever the
  -- first difference (a byte at a time cost 4 times as much: 20 us of Redis a call).
  local stored = rec[1] or ''
  local diff = 0
  if #stored ~= #digest then diff = 1 end
  for i = 1, #digest, 8 do
    diff = bit.bor(diff, bit.bxor(tonumber(string.sub(digest, i, i + 7), 16),
                                  tonumber(string.sub(stored, i, i + 7), 16) or 0))
  end
  if diff ~= 0 or rec[2] then
    local counted, _, _, fail_retry = gcra(fail_key, fail_interval, fail_burst, now, true)
    if not counted then return {'throttled', 0, 0, 0, fail_retry, 0} end
    return {'unauthorized', 0, 0, 0, 0, 0}
  end
  if rec[3] then interval = 1000000 / tonumber(rec[3]) end
  if rec[4] then burst = tonumber(rec[4]) end
  local allowed, remaining, reset, retry = gcra(rate_key, interval, burst, now, true)
  local outcome = 'ok'
  if not allowed then outcome = 'rate_limited' end
  -- The policy's quota and window (draft-ietf-httpapi-ratelimit-headers): the
  -- sustained rate as q calls per w seconds, with q at least the burst.
  local window = math.max(1, math.ceil(burst * interval / 1000000))
  local quota = math.max(burst, math.floor(window * 1000000 / interval))
  return {outcome, quota, remaining, math.ceil(reset), math.ceil(retry), window}
end
"""

# KEYS: the key's record, its rate-limit key, the address's failure key.
# ARGV: as ``Credentials.script_args``.
AUTHORIZE_LUA = AUTHORIZE_FUNCTIONS_LUA + """
return authorize(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
                 tonumber(ARGV[4]), tonumber(ARGV[5]))
"""

# Anything shaped like one of our keys, anywhere in a text (see ``redact``).
_KEY_IN_TEXT = re.compile(r"oek_([0-9a-f]{16})_[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """``text`` with the secret part of every API key in it replaced (the id stays,
    to say which key it was): for logs and messages that quote what a client sent."""
    return _KEY_IN_TEXT.sub(lambda match: f"oek_{match.group(1)}_<redacted>", text)


def new_key() -> tuple[str, str]:
    """A new API key: (key id, the whole key). The key is shown once and never stored."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def key_digest(key: str) -> str:
    """SHA-256 of the whole key, hex: all Redis keeps of it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a request presents: a well-formed key's id (which names its record and
    owns its orders) and the digest of the whole key (checked in Redis)."""

    key_id: str
    digest: str

    @classmethod
    def parse(cls, key: str) -> Credentials | None:
        """The credentials in ``key``, or None if it is not shaped like one of ours."""
        match = _KEY.fullmatch(key)
        return cls(match.group(1), key_digest(key)) if match else None

    def script_keys(self, address: str) -> list[str]:
        """KEYS of the authorize step, for a request from ``address``."""
        return [keys.api_key(self.key_id), keys.rate_limit(self.key_id), keys.auth_failures(address)]

    def script_args(self, config: Config) -> list[str | int]:
        """ARGV of the authorize step: the digest, then the default rate limit and the
        failed-attempt limit, as GCRA intervals (us) and bursts."""
        return [
            self.digest,
            repr(1_000_000 / config.rate_limit_per_sec),
            config.rate_limit_burst,
            repr(config.auth_failure_interval_secs * 1_000_000),
            config.auth_failure_burst,
        ]


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """A key's rate limit as one authorize step left it, for the answer's headers
    (draft-ietf-httpapi-ratelimit-headers-10: a quota of ``quota`` calls a window of
    ``window_secs``; ``remaining`` calls would pass now; the quota is whole again in
    ``reset_secs``), and, when refused, ``retry_after_secs`` (RFC 9110 section 10.2.3)."""

    quota: int
    remaining: int
    reset_secs: int
    window_secs: int
    retry_after_secs: int

    @classmethod
    def from_reply(cls, reply: list[Any]) -> RateLimit | None:
        """From the authorize step's {quota, remaining, reset us, retry us, window s};
        None when no key's limit was consulted (quota 0)."""
        quota, remaining, reset_us, retry_us, window = (int(value) for value in reply)
        if quota <= 0:
            return None
        return cls(
            quota=quota,
            remaining=max(0, remaining),
            reset_secs=math.ceil(reset_us / 1e6),
            window_secs=max(1, window),
            retry_after_secs=max(1, math.ceil(retry_us / 1e6)) if retry_us > 0 else 0,
        )

    def headers(self) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (structured fields, draft -10)."""
        return {
            "RateLimit-Policy": f'"per-key";q={self.quota};w={self.window_secs}',
            "RateLimit": f'"per-key";r={self.remaining};t={self.reset_secs}',
        }


@dataclasses.dataclass(frozen=True)
class Authorization:
    """The authorize step's answer: ``outcome``; the key's rate limit after this call
    (None when it was not consulted: AUTH=off, or a refusal before it); and for a
    refusal that a wait will lift (``throttled``: the address's failures;
    ``rate_limited``: the key's limit), the seconds to wait (else 0)."""

    outcome: str
    rate_limit: RateLimit | None
    retry_after_secs: int = 0

    @classmethod
    def from_reply(cls, outcome: str, values: list[Any]) -> Authorization:
        """From an outcome and the step's {quota, remaining, reset us, retry us,
        window s}."""
        if outcome == "throttled":
            return cls(outcome, None, max(1, math.ceil(int(values[3]) / 1e6)))
        limit = RateLimit.from_reply(values)
        retry = limit.retry_after_secs if limit is not None and outcome == "rate_limited" else 0
        return cls(outcome, limit, retry)


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """One API key as ``ApiKeys.records`` shows it: never the key itself."""

    key_id: str
    name: str
    created_at: float
    rate: float | None
    burst: int | None
    revoked_at: float | None


class ApiKeyError(ValueError):
    """A key-management request that cannot be done (bad name, unknown key...)."""


class ApiKeys:
    """Creates, lists, revokes and checks API keys in Redis (``keys.api_key``)."""

    def __init__(self, redis: Redis, config: Config) -> None:
        self.redis = redis
        self.config = config
        self._authorize = redis.register_script(AUTHORIZE_LUA)

    async def create(
        self, name: str, *, rate: float | None = None, burst: int | None = None, key: str | None = None
    ) -> str:
        """Store a new key named ``name`` (1-64 of letters, digits and ``._@-``) with
        optional limits (calls a second on average, calls at once); returns the key,
        which is shown once: Redis keeps only its digest. ``key``: store this one
        (made elsewhere, e.g. kept in a secret store) instead of a new random one.
        Raises ApiKeyError."""
        if not _NAME.fullmatch(name):
            raise ApiKeyError("a key's name is 1 to 64 letters, digits, '.', '_', '@' or '-'")
        if rate is not None and not (math.isfinite(rate) and MIN_RATE <= rate <= MAX_RATE):
            raise ApiKeyError(f"rate must be a number of calls a second from {MIN_RATE:g} to {MAX_RATE:g}")
        if burst is not None and not 1 <= burst <= MAX_BURST:
            raise ApiKeyError(f"burst must be a whole number of calls from 1 to {MAX_BURST:,}")
        if key is None:
            key_id, key = new_key()
        else:
            given = Credentials.parse(key)
            if given is None:
                raise ApiKeyError("a key is oek_, 16 hex digits, _ and 43 base64url characters")
            key_id = given.key_id
        record: dict[str, str] = {"digest": key_digest(key), "name": name, "created_at": repr(time.time())}
        if rate is not None:
            record["rate"] = repr(float(rate))
        if burst is not None:
            record["burst"] = str(burst)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(key_id))  # a stored key starts afresh: no old limits
            pipe.hset(keys.api_key(key_id), items=[part for pair in record.items() for part in pair])
            pipe.sadd(keys.API_KEYS, key_id)
            await pipe.execute()
        return key

    async def records(self) -> list[KeyRecord]:
        """Every key ever created (revoked ones too), oldest first."""
        ids = sorted(cast(set[str], await self.redis.smembers(keys.API_KEYS)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(keys.api_key(key_id))
            records = cast(list[dict[str, str]], await pipe.execute())
        out = [
            KeyRecord(
                key_id=key_id,
                name=record.get("name", ""),
                created_at=float(record.get("created_at", 0)),
                rate=float(record["rate"]) if "rate" in record else None,
                burst=int(record["burst"]) if "burst" in record else None,
                revoked_at=float(record["revoked_at"]) if "revoked_at" in record else None,
            )
            for key_id, record in zip(ids, records, strict=True)
            if record
        ]
        return sorted(out, key=lambda record: record.created_at)

    async def revoke(self, which: str) -> KeyRecord:
        """Revoke the key with id ``which``, or the one live key named ``which``;
        every web process refuses it from its next request on. Returns its record as
        it was; raises ApiKeyError when no live key (or more than one) matches."""
        live = [record for record in await self.records() if record.revoked_at is None]
        matches = [record for record in live if which in (record.key_id, record.name)]
        by_id = [record for record in matches if record.key_id == which]
        if by_id:
            matches = by_id
        if not matches:
            raise ApiKeyError(f"no live key has the id or name {which!r}")
        if len(matches) > 1:
            raise ApiKeyError(f"{len(matches)} live keys are named {which!r}: revoke one by its id")
        await self.redis.hset(keys.api_key(matches[0].key_id), "revoked_at", repr(time.time()))
        return matches[0]

    async def is_live(self, key: str) -> bool:
        """Whether ``key`` is a key of ours that exists and is not revoked (no rate
        limit is taken: for the dev key file's check at start)."""
        credentials = Credentials.parse(key)
        if credentials is None:
            return False
        digest, revoked = await self.redis.hmget(
            keys.api_key(credentials.key_id), ["digest", "revoked_at"]
        )
        return digest is not None and revoked is None and secrets.compare_digest(
            str(digest), credentials.digest
        )

    async def authorize(self, credentials: Credentials, address: str) -> Authorization:
        """The authorize step for a request from ``address`` (see the module's
        docstring): one atomic script, which takes one call of the key's rate limit
        when the key is good. Raises what redis-py raises when Redis is unreachable."""
        reply = await self._authorize(
            keys=credentials.script_keys(address),
            args=credentials.script_args(self.config),
        )
        return Authorization.from_reply(reply[0], list(reply[1:6]))

    async def live_ids(self, key_ids: list[str]) -> set[str]:
        """Which of ``key_ids`` still name a live (not revoked) key."""
        if not key_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hmget(keys.api_key(key_id), ["digest", "revoked_at"])
            replies = cast(list[list[str | None]], await pipe.execute())
        return {
            key_id
            for key_id, (digest, revoked) in zip(key_ids, replies, strict=True)
            if digest is not None and revoked is None
        }
