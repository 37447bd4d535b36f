"""The order store: every read and atomic write of order state in Redis.

Each state change is one Lua script, so a status is checked, recorded and published
to both event streams in a single step. Scripts are safe to run twice (redis-py and
engine.core.pipelined may re-send one after a connection error): creating an order whose
hash exists, or moving an order to the status it already has, changes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

from redis.asyncio import Redis

from engine.core import accounts, keys, strict_json
from engine.core.config import Config
from engine.core.pipelined import HotPath, PipelinedRedis, Unanswered, field_values
from engine.core.status import ALLOWED, Order, OrderStatus

logger = logging.getLogger(__name__)

# The statuses by name, for the modules that import them from here.
PENDING = OrderStatus.PENDING
ROUTING = OrderStatus.ROUTING
BUILDING = OrderStatus.BUILDING
SUBMITTED = OrderStatus.SUBMITTED
CONFIRMED = OrderStatus.CONFIRMED
FAILED = OrderStatus.FAILED
STATUSES = tuple(OrderStatus)


# A stream read, as the decoding client returns it: [(entry id, {field: value})].
StreamEntries = list[tuple[str, dict[str, str]]]


def _lua_allowed_table() -> str:
    rows = []
    for src, dests in ALLOWED.items():
        inner = ", ".join(f"[{json.dumps(d)}]=true" for d in sorted(dests))
        rows.append(f"[{json.dumps(src)}]={{{inner}}}")
    return "{" + ", ".join(rows) + "}"


# KEYS: order hash, order events, all events, orders stream, idempotency key (or any
#       placeholder when there is none), status counters, then for the authorize
#       step (engine.core.accounts; placeholders when AUTH=off) the API key's record,
#       its rate-limit key and the client address's failure key, and last the API
#       key's order list (keys.key_orders)
# ARGV: 1 order id, 2 event body (JSON object without seq), 3 now, 4 request JSON,
#       5 request hash ("" = no idempotency key), 6 idempotency TTL, 7 events maxlen,
#       8 deadline: Redis TIME in microseconds after which nothing is created ("" =
#       none), 9 owner (the API key's id), 10 "1" to authorize ("" when AUTH=off),
#       11-15 the authorize step's arguments (Credentials.script_args), 16 the most
#       orders that may wait for a worker (0 = no limit), 17 the executors' group
# Reply: {outcome, order id, then the rate limit: quota, remaining, reset us, retry us,
#         window s (zeros when no key was consulted)}.
# Steps: a re-sent script whose first run created the order says so first (so a
# retried send never takes a second call of the rate limit, nor is refused by it);
# then the key, its limit, the idempotency key, the backpressure limit and the
# deadline; each refusal creates nothing. The deadline comes after the "already
# done" answers, so a re-sent script whose first run created the order still says so,
# however late it arrives.
_CREATE_LUA = accounts.AUTHORIZE_FUNCTIONS_LUA + """
local none = {0, 0, 0, 0, 0}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'created', ARGV[1], unpack(none)}
end
local limit = none
if ARGV[10] == '1' then
  local auth = authorize(KEYS[7], KEYS[8], KEYS[9], ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]),
                         tonumber(ARGV[14]), tonumber(ARGV[15]))
  limit = {auth[2], auth[3], auth[4], auth[5], auth[6]}
  if auth[1] ~= 'ok' then return {auth[1], '', unpack(limit)} end
end
if ARGV[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local sep = string.find(existing, '|', 1, true)
    local oid = string.sub(existing, 1, sep - 1)
    if string.sub(existing, sep + 1) == ARGV[5] then return {'replayed', oid, unpack(limit)} end
    return {'conflict', oid, unpack(limit)}
  end
end
local max_lag = tonumber(ARGV[16])
local waiting = max_lag > 0 and redis.call('XLEN', KEYS[4]) or 0
if max_lag > 0 and waiting >= max_lag then
  -- Entries leave the stream once a worker is done with them: those still in it are
  -- waiting, or being worked on (pending in the group).
  local pending = redis.pcall('XPENDING', KEYS[4], ARGV[17])
  if type(pending) == 'table' and not pending.err then waiting = waiting - pending[1] end
  if waiting >= max_lag then return {'overloaded', '', unpack(limit)} end
end
if ARGV[8] ~= '' then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[8]) then
    -- The request has been answered (or is about to be) without this order: a
    -- late create must not make an order the client was told does not exist.
    return {'expired', ARGV[1], unpack(limit)}
  end
end
local data = '{"seq":1,' .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'status', 'pending', 'seq', 1, 'owner', ARGV[9],
           'request', ARGV[4], 'created_at', ARGV[3], 'updated_at', ARGV[3], 'attempts', 0)
redis.call('XADD', KEYS[2], '*', 'seq', 1, 'data', data)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'id', ARGV[1], 'seq', 1, 'owner', ARGV[9],
           'data', data)
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
redis.call('XADD', KEYS[10], '*', 'id', ARGV[1])
redis.call('HINCRBY', KEYS[6], 'pending', 1)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[1] .. '|' .. ARGV[5], 'EX', ARGV[6])
end
return {'created', ARGV[1], unpack(limit)}
"""

# Lua: whether orders-stream ``entry`` is pending in ``group`` for ``consumer`` (a
# worker frozen past the claim time and thawed finds it another's, or acknowledged).
OWNED_BY_LUA = """
local function owned_by(stream, group, entry, consumer)
  local row = redis.call('XPENDING', stream, group, entry, entry, 1)
  return row[1] ~= nil and row[1][2] == consumer
end
"""

# KEYS: order hash, order events, all events, status counters, orders stream
# ARGV: new status, event body (JSON object without seq), now, events maxlen,
#       TTL for a finished order, statuses the order must be in (comma-separated,
#       "" = any it may leave), a field the order must not have ("" = none), the
#       orders-stream entry and consumer that must own it ("" = any) and the group,
#       the API key that must own the order ("" = any; another's is answered as an
#       unknown order), then field/value pairs to store on the hash
# Reply: {1, the event, 1 if the orders-stream entry was acknowledged (a terminal
#         status with an owning entry) else 0}, or {0 (refused) or -1 (the entry is
#         another's), the current status ("" for an unknown order)}.
_TRANSITION_LUA = (
    OWNED_BY_LUA
    + "local allowed = "
    + _lua_allowed_table()
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if not allowed[cur] or not allowed[cur][ARGV[1]] then return {0, cur} end
if ARGV[6] ~= '' and not string.find(',' .. ARGV[6] .. ',', ',' .. cur .. ',', 1, true) then
  return {0, cur}
end
if ARGV[7] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[7]) == 1 then
  return {0, cur}
end
if ARGV[11] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[11] then
  return {0, ''}
end
if ARGV[8] ~= '' and not owned_by(KEYS[5], ARGV[10], ARGV[8], ARGV[9]) then
  return {-1, cur}
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local data = '{"seq":' .. seq .. ',' .. string.sub(ARGV[2], 2)
local who = redis.call('HMGET', KEYS[1], 'id', 'owner')
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3])
if #ARGV > 11 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 12))
end
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'data', data)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'id', who[1], 'seq', seq,
           'owner', who[2] or '', 'data', data)
if next(allowed[ARGV[1]]) == nil then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  if ARGV[8] ~= '' then
    -- Finished by its entry's owner: the entry is acknowledged and deleted with it.
    redis.call('XACK', KEYS[5], ARGV[10], ARGV[8])
    redis.call('XDEL', KEYS[5], ARGV[8])
    return {1, data, 1}
  end
end
return {1, data, 0}
"""
)


# KEYS: order hash. ARGV: the attempts after which none is counted (the driver's
# MAX_ATTEMPTS), a token new to this call. Counts an attempt of an order that is not
# finished and has attempts left, then reads it. Reply: {1 if counted else 0, the
# hash as HGETALL gives it ({} for an unknown order)}. The token makes a re-sent copy
# of the call (its first reply lost with the connection) answer as the first did,
# without counting again: else the copy could find the attempts used up by its own
# first run, and the order would fail without that attempt.
_BEGIN_ATTEMPT_LUA = (
    "local allowed = "
    + _lua_allowed_table()
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, {}} end
local counted = 0
if redis.call('HGET', KEYS[1], 'attempt_token') == ARGV[2] then
  counted = 1
elseif allowed[status] and next(allowed[status]) ~= nil
   and tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') < tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'attempt_token', ARGV[2])
  counted = 1
end
return {counted, redis.call('HGETALL', KEYS[1])}
"""
)


# The nonce rule (EIP-155 nonces, one account): a transaction may take nonce N only
# if N is the account's next free nonce, which then becomes N + 1. Taking exactly the
# next one leaves no gap; the key only moves forward, inside the step that records
# the transaction (or, for a transaction that is not an order's, claims the nonce).
# The signed transaction goes, in the same step, into the account's ledger (a sorted
# set scored by nonce), so a worker that starts can send every taken nonce's
# transaction that the node does not have (EvmChain.reconcile).
# KEYS[2]: the next-free-nonce key, KEYS[3]: the ledger; ARGV[3]: the nonce, or ""
# for none; ARGV[4]: the signed transaction (0x-hex).
_NONCE_RULE_LUA = """
if ARGV[3] ~= '' then
  local free = redis.call('GET', KEYS[2])
  if free and tonumber(ARGV[3]) ~= tonumber(free) then return -1 end
  redis.call('SET', KEYS[2], string.format('%d', tonumber(ARGV[3]) + 1))
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
end
"""

# KEYS: order hash, next-free-nonce key, the account's ledger (the order hash again
# for both when the transaction has no nonce), the orders stream. ARGV: tx_hash, the
# transaction's record, its nonce or "", the signed transaction, the orders-stream
# entry and consumer that must own the order ("" = any) and the group.
# Recorded only while the order is building and has no transaction yet, and (with an
# entry) only by the worker whose entry it still is.
_RECORD_TX_LUA = (
    OWNED_BY_LUA
    + """
if ARGV[5] ~= '' and not owned_by(KEYS[4], ARGV[7], ARGV[5], ARGV[6]) then return -2 end
if redis.call('HGET', KEYS[1], 'status') ~= 'building' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'tx_hash') == 1 then return 0 end
"""
    + _NONCE_RULE_LUA
    + """
redis.call('HSET', KEYS[1], 'tx_hash', ARGV[1], 'tx', ARGV[2], 'tx_hashes', cjson.encode({ARGV[1]}))
return 1
"""
)

# KEYS: order hash, the account's ledger. ARGV: the replaced tx_hash, the new tx_hash,
# the new transaction's record, its nonce (the replaced one's), its signed bytes.
# A replacement (same nonce, higher fees) of the order's current transaction, while
# it is still out: the replaced one's record is kept in ``tx_prior`` (either may be
# mined), every hash in ``tx_hashes``.
_RECORD_REPLACEMENT_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'building' and status ~= 'submitted' then return 0 end
if redis.call('HGET', KEYS[1], 'tx_hash') ~= ARGV[1] then return 0 end
local prior = cjson.decode(redis.call('HGET', KEYS[1], 'tx_prior') or '[]')
table.insert(prior, redis.call('HGET', KEYS[1], 'tx'))
local hashes = cjson.decode(redis.call('HGET', KEYS[1], 'tx_hashes') or cjson.encode({ARGV[1]}))
table.insert(hashes, ARGV[2])
redis.call('HSET', KEYS[1], 'tx_hash', ARGV[2], 'tx', ARGV[3], 'tx_prior', cjson.encode(prior),
           'tx_hashes', cjson.encode(hashes))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""

# A transaction that is not an order's (an ERC-20 approval, a gap filler) takes its
# nonce by the same rule, into the same ledger.
# KEYS: (unused), next-free-nonce key, the ledger. ARGV: (unused), (unused), the
# nonce, the signed transaction.
CLAIM_NONCE_LUA = _NONCE_RULE_LUA + "\nreturn 1\n"

# KEYS: next-free-nonce key. ARGV: a nonce the chain already counts (its pending
# transaction count). The key moves up to it, never down.
RAISE_NONCE_FLOOR_LUA = """
local free = redis.call('GET', KEYS[1])
if (not free) or tonumber(free) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return tonumber(free)
"""


class Recorded(enum.IntEnum):
    """What OrderStore.record_tx did."""

    RECORDED = 1
    # The order is no longer building, or another worker recorded its transaction.
    NOT_BUILDING = 0
    # The nonce is already held by a recorded transaction: build again with a new one.
    NONCE_TAKEN = -1
    # The orders-stream entry is no longer the caller's (``owned_by``): stop.
    LOST = -2


class RedisClock:
    """This process's view of Redis's clock (``TIME``), for deadlines that a script
    checks against it: hosts' clocks may differ, Redis's is the one that decides.

    ``offset_secs`` is Redis's time less this host's, measured over one round trip
    (so within half of it); 0 until the first ``sync``.
    """

    # A sample over a slower round trip than this says too little; keep the last.
    MAX_SAMPLE_RTT_SECS = 0.2
    # Offsets beyond this are worth an operator's attention (NTP not running?).
    WARN_OFFSET_SECS = 0.25

    def __init__(self) -> None:
        self.offset_secs = 0.0

    async def sync(self, read_time: Callable[[], Awaitable[Sequence[int | str]]]) -> bool:
        """Measure the offset with one TIME command (``read_time`` sends it and
        returns its reply: seconds and microseconds); False if the sample was too
        slow to use. Raises what the client raises when Redis is unreachable."""
        sent = time.time()
        seconds, micros = (int(part) for part in await read_time())
        received = time.time()
        if received - sent > self.MAX_SAMPLE_RTT_SECS:
            return False
        offset = seconds + micros / 1e6 - (sent + received) / 2
        if abs(offset) > self.WARN_OFFSET_SECS and abs(self.offset_secs) <= self.WARN_OFFSET_SECS:
            logger.warning("Redis's clock is %+.3f s from this host's; deadlines follow Redis's",
                           offset)
        self.offset_secs = offset
        return True

    def redis_micros(self, epoch: float) -> int:
        """Local epoch seconds as Redis's TIME would read them, in microseconds."""
        return int((epoch + self.offset_secs) * 1_000_000)


# GET /api/orders reads a key's order list in batches of LIST_BATCH entries, and at
# most LIST_SCAN_MAX entries for one page (a status filter may skip many).
LIST_BATCH = 100
LIST_SCAN_MAX = 1000
# A key's order list is pruned of expired orders' entries every PRUNE_EVERY creates of
# a web process, PRUNE_BATCH of its oldest entries at a time (OrderStore.prune_key_orders).
PRUNE_EVERY = 16
PRUNE_BATCH = 32
# Each part of a stream entry id is an unsigned 64-bit number.
_MAX_ID_PART = 2**64 - 1

CreateOutcome = Literal[
    "created", "replayed", "conflict", "expired", "overloaded", "unauthorized", "throttled",
    "rate_limited",
]


@dataclasses.dataclass(frozen=True)
class CreateResult:
    """What the create script did (OrderStore.create). Only ``created`` created
    anything; ``order_id`` is "" for the refusals before the idempotency key was read
    (``unauthorized``, ``throttled``, ``rate_limited``, ``overloaded``).
    ``authorization``: the authorize step's part of the answer (rate limit, wait)."""

    order_id: str
    outcome: CreateOutcome
    authorization: accounts.Authorization = accounts.Authorization("created", None)


@dataclasses.dataclass(frozen=True)
class TransitionResult:
    """What the transition script did.

    ``applied``: the status changed and ``event`` (JSON text) was published.
    Otherwise ``current`` is the order's status ("" for an unknown order); when it
    equals the requested status the step had already been taken, which callers
    resuming after a crash treat as done.
    """

    applied: bool
    current: str
    # Refused because the orders-stream entry is no longer the caller's (``owned_by``).
    lost: bool = False
    event: str | None = None
    # A terminal status set with ``owned_by``: the entry was acknowledged (XACK) and
    # deleted in the same step.
    acknowledged: bool = False


def utc_timestamp(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds, as every message carries it:
    ``2026-11-24T22:40:01.123Z``, the same text as
    ``datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")``
    with "Z" for "+00:00". Every status message and every order creates one, so the
    date and time part is kept for the current second (a third of the cost)."""
    if epoch < 0:
        return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)  # as datetime rounds it, half to even
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_utc_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def stored_field(value: Any) -> str:
    """A value as the order hash stores it: text as it is, anything else as JSON
    (a Decimal as its exact number)."""
    return value if isinstance(value, str) else strict_json.dumps_text(value)


def event_body(order_id: str, status: str, epoch: float, fields: Mapping[str, Any]) -> str:
    """A status message without its seq (the scripts add it, atomically)."""
    message: dict[str, Any] = {"order_id": order_id, "status": status}
    message.update(fields)
    message["timestamp"] = utc_timestamp(epoch)
    return strict_json.dumps_text(message)


class OrderStore:
    """Owns every order key; handlers and the worker go through it.

    With ``pipe``, the hot path (``hot``: the scripts, and the reads of one order) goes
    over that pipelined connection instead of redis-py (see engine.core.pipelined);
    everything else uses ``redis``. Each script is safe to run twice, as either
    client may re-send one.
    """

    def __init__(self, redis: Redis, config: Config, pipe: PipelinedRedis | None = None) -> None:
        self.redis = redis
        self.config = config
        self.clock = RedisClock()
        self._pipe = pipe
        self.hot = HotPath(redis, pipe)
        self._create = self.hot.script(_CREATE_LUA)
        self._transition = self.hot.script(_TRANSITION_LUA)
        self._record_tx = self.hot.script(_RECORD_TX_LUA)
        self._record_replacement = self.hot.script(_RECORD_REPLACEMENT_LUA)
        self._begin_attempt = self.hot.script(_BEGIN_ATTEMPT_LUA)

    async def sync_clock(self) -> bool:
        """Measure Redis's clock (RedisClock.sync) over the connection the create
        script goes over; see RedisClock.sync for the answer and errors."""
        pipe = self._pipe
        if pipe is not None:
            return await self.clock.sync(lambda: pipe.execute("TIME"))
        return await self.clock.sync(self.redis.time)

    async def create(
        self,
        order_id: str,
        request: Mapping[str, Any],
        idempotency_key: str | None = None,
        *,
        credentials: accounts.Credentials | None = None,
        address: str = "",
        deadline: float | None = None,
        unanswered: Unanswered | None = None,
    ) -> CreateResult:
        """Store a new order, its ``pending`` event, its orders-stream entry and its
        entry in the owner's order list at once.

        With ``credentials`` (a request's API key, from client ``address``), the
        authorize step of engine.core.accounts runs first, in the same script: a
        refusal (``unauthorized``, ``throttled``, ``rate_limited``) creates nothing,
        and the order belongs to the key's id. Without (AUTH=off), it belongs to
        ``accounts.ANONYMOUS``.

        ``request`` is stored in its canonical form (strict_json.canonical: exact
        numbers, sorted keys). With an idempotency key (scoped to the owner), an
        earlier order made with the same key is returned instead (``replayed``) if
        its request had the same canonical form, else ``conflict``. While
        ``config.max_queue_lag`` orders wait for a worker, nothing is created:
        ``overloaded``. With ``deadline`` (epoch seconds on this host), a script that
        runs after it (on Redis's clock) creates nothing: ``expired``.
        ``unanswered`` tells a caller whose call failed whether the script may have
        run all the same (see engine.core.pipelined.Unanswered).
        """
        now = time.time()
        config = self.config
        owner = credentials.key_id if credentials is not None else accounts.ANONYMOUS
        request_json = strict_json.canonical(request)
        request_hash = ""
        order_key = keys.order(order_id)
        idem_key = order_key  # a placeholder the script does not touch
        if idempotency_key:
            idem_key = keys.idempotency(owner, idempotency_key)
            request_hash = hashlib.sha256(request_json.encode()).hexdigest()
        if credentials is not None:
            auth_keys = credentials.script_keys(address)
            auth_args = credentials.script_args(config)
        else:
            auth_keys, auth_args = [order_key] * 3, ["", 0, 0, 0, 0]
        script_keys = [
            order_key,
            keys.order_events(order_id),
            keys.EVENTS_STREAM,
            keys.ORDERS_STREAM,
            idem_key,
            keys.COUNTERS,
            *auth_keys,
            keys.key_orders(owner),
        ]
        script_args: list[str | int] = [
            order_id,
            event_body(order_id, PENDING, now, {}),
            repr(now),
            request_json,
            request_hash,
            config.idempotency_ttl_secs,
            config.events_maxlen,
            "" if deadline is None else self.clock.redis_micros(deadline),
            owner,
            "1" if credentials is not None else "",
            *auth_args,
            config.max_queue_lag,
            keys.EXECUTORS_GROUP,
        ]
        reply = await self._create(keys=script_keys, args=script_args, unanswered=unanswered)
        authorization = accounts.Authorization.from_reply(reply[0], list(reply[2:7]))
        return CreateResult(order_id=reply[1], outcome=reply[0], authorization=authorization)

    async def transition(
        self,
        order_id: str,
        status: str,
        *,
        only_from: Collection[str] = (),
        unless_recorded: str = "",
        unanswered: Unanswered | None = None,
        owned_by: tuple[str, str] | None = None,
        owner: str | None = None,
        **fields: Any,
    ) -> TransitionResult:
        """Move an order to ``status`` and publish the message, if the move is allowed
        (and, with ``only_from``, if the order is in one of those statuses; with
        ``unless_recorded``, if the order has no such field, e.g. no tx_hash yet;
        with ``owned_by`` = (orders-stream entry id, consumer), only if that entry is
        that consumer's in the executors group, checked in the same atomic step:
        else ``lost``, and a worker that lost the order to another changes nothing;
        with ``owner``, only an order that API key owns: another's is answered as an
        unknown one, ``current`` ""). A terminal status set with ``owned_by``
        acknowledges and deletes the entry in the same step (``acknowledged``).

        ``fields`` go both into the message and onto the order hash (``None`` values
        are left out). ``unanswered``: as for ``create``.
        """
        if status not in ALLOWED:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        clean = {k: v for k, v in fields.items() if v is not None}
        pairs: list[Any] = []
        for name, value in clean.items():
            pairs.extend((name, stored_field(value)))
        reply = await self._transition(
            keys=[
                keys.order(order_id),
                keys.order_events(order_id),
                keys.EVENTS_STREAM,
                keys.COUNTERS,
                keys.ORDERS_STREAM,
            ],
            args=[
                status,
                event_body(order_id, status, now, clean),
                repr(now),
                self.config.events_maxlen,
                self.config.order_ttl_secs,
                ",".join(only_from),
                unless_recorded,
                owned_by[0] if owned_by else "",
                owned_by[1] if owned_by else "",
                keys.EXECUTORS_GROUP,
                owner or "",
                *pairs,
            ],
            unanswered=unanswered,
        )
        applied, data = reply[0], reply[1]
        if applied == 1:
            return TransitionResult(applied=True, current=status, event=data, acknowledged=reply[2] == 1)
        return TransitionResult(applied=False, current=data, lost=applied == -1)

    async def counters(self) -> dict[str, int]:
        """Running totals: orders that reached each status, ``retries``, ``dead_letters``."""
        counts = cast(dict[str, str], await self.redis.hgetall(keys.COUNTERS))
        return {name: int(value) for name, value in counts.items()}

    async def count(self, name: str) -> None:
        """Add one to a running total (see ``counters``)."""
        await self.redis.hincrby(keys.COUNTERS, name, 1)

    async def get(self, order_id: str) -> Order | None:
        """The order, or None for an unknown order."""
        data = await self.hot.hgetall(keys.order(order_id))
        return Order.from_hash(data) if data else None

    async def exists(self, order_id: str) -> bool:
        """Whether the order is known (and not expired)."""
        return await self.hot.exists(keys.order(order_id))

    async def record_tx(
        self,
        order_id: str,
        tx_hash: str,
        record: str = "",
        *,
        nonce_key: str | None = None,
        nonce: int | None = None,
        ledger_key: str | None = None,
        raw: str = "",
        owned_by: tuple[str, str] | None = None,
    ) -> Recorded:
        """Record the transaction about to be sent (its hash, and ``record``: what
        resending it takes), in one atomic step, if the order is still ``building``
        and has no transaction yet (else NOT_BUILDING: e.g. cancelled meanwhile, or
        another worker recorded one; nothing may be sent but that one). With a
        ``nonce``, the account's next free nonce in ``nonce_key`` moves past it in
        the same step, and ``raw`` (the signed transaction) goes into the account's
        ledger (``ledger_key``); or NONCE_TAKEN if it is not the next free one.
        With ``owned_by`` = (orders-stream entry id, consumer), only while that
        entry is that consumer's, checked in the same step (else LOST).
        Once recorded, a cancel is refused: the trade may go out."""
        if not ((nonce is None) == (nonce_key is None) == (ledger_key is None)):
            raise ValueError("a nonce needs its account's key and ledger, and they a nonce")
        order_key = keys.order(order_id)
        outcome = await self._record_tx(
            keys=[order_key, nonce_key or order_key, ledger_key or order_key, keys.ORDERS_STREAM],
            args=[tx_hash, record, "" if nonce is None else str(nonce), raw,
                  owned_by[0] if owned_by else "", owned_by[1] if owned_by else "",
                  keys.EXECUTORS_GROUP],
        )
        return Recorded(int(outcome))

    async def record_replacement(
        self, order_id: str, replaced: str, tx_hash: str, record: str, *, ledger_key: str, nonce: int, raw: str
    ) -> Recorded:
        """Record ``tx_hash`` (same nonce as ``replaced``, higher fees) as the order's
        transaction, in one atomic step, if ``replaced`` is still its transaction and
        the order is still out (else NOT_BUILDING); the replaced one's record stays
        in the order's ``tx_prior``, for either may be mined, and the signed bytes go
        into the account's ledger under the nonce."""
        outcome = await self._record_replacement(
            keys=[keys.order(order_id), ledger_key], args=[replaced, tx_hash, record, str(nonce), raw]
        )
        return Recorded(int(outcome))

    async def list_orders(
        self, owner: str, *, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[Order], str | None]:
        """A page of ``owner``'s orders, newest first: at most ``limit``, only those
        now in ``status`` if given, all created before the order whose list entry is
        ``cursor`` (a stream entry id, as returned; None = from the newest).

        Returns the page and the cursor of the next one: None when no older entry
        is left. Pages stay correct while orders are created (a new order's entry
        comes after every cursor handed out). With a ``status`` a page may be shorter
        than ``limit`` yet have a next one: at most LIST_SCAN_MAX entries are read
        per page. Entries of expired orders are dropped as they are met."""
        index = keys.key_orders(owner)
        end = "+"
        if cursor:
            millis, _, sequence = cursor.partition("-")
            if int(millis) > _MAX_ID_PART or int(sequence or 0) > _MAX_ID_PART:
                end = "+"  # past every entry id: from the newest
            elif int(millis) == int(sequence or 0) == 0:
                return [], None  # nothing is older than 0-0 (nor can Redis say so)
            else:
                end = f"({int(millis)}-{int(sequence or 0)}"
        found: list[Order] = []
        stale: list[str] = []
        scanned = 0
        last: str | None = None
        exhausted = False
        while len(found) < limit and scanned < LIST_SCAN_MAX:
            wanted = LIST_BATCH if status is not None else limit - len(found)
            count = min(wanted, LIST_BATCH, LIST_SCAN_MAX - scanned)
            entries = cast(StreamEntries, await self.redis.xrevrange(index, end, "-", count=count))
            async with self.redis.pipeline(transaction=False) as pipe:
                for _entry_id, fields in entries:
                    pipe.hgetall(keys.order(fields.get("id", "")))
                hashes = cast(list[dict[str, str]], await pipe.execute()) if entries else []
            for (entry_id, _fields), data in zip(entries, hashes, strict=True):
                scanned += 1
                last = entry_id
                if not data:
                    stale.append(entry_id)
                elif status is None or data.get("status") == status:
                    found.append(Order.from_hash(data))
                    if len(found) == limit:
                        break
            if len(entries) < count and (not entries or last == entries[-1][0]):
                exhausted = True  # every entry the list has was read
                break
            end = f"({last}"
        if not exhausted and last is not None:
            # A full page: is there anything older? (So the last page says so.)
            exhausted = not await self.redis.xrevrange(index, f"({last}", "-", count=1)
        if stale:
            await self.redis.xdel(index, *stale)
        return found, None if exhausted else last

    async def prune_key_orders(self, owner: str, count: int = PRUNE_BATCH) -> int:
        """Drop the entries of ``owner``'s order list (keys.key_orders) whose order
        has expired, among its ``count`` oldest older than ``config.order_ttl_secs``
        (no younger order can have expired); how many went. Not atomic, and need
        not be: an entry is only dropped once its order is gone for good.

        Outside the create script on purpose: that script must not read another
        order's keys (DESIGN.md, past one Redis). The POST handler calls this once
        every PRUNE_EVERY creates, so a key that never lists its orders keeps a list
        about the size of the orders it has (orders expire no faster than they are
        created)."""
        index = keys.key_orders(owner)
        # An order expires order_ttl_secs after it finished, so no sooner than that
        # after its creation, which its entry's id records (Redis's clock, in ms):
        # younger entries need no look.
        newest = self.clock.redis_micros(time.time()) // 1000 - self.config.order_ttl_secs * 1000
        if newest < 0:
            return 0
        entries = cast(StreamEntries, await self.redis.xrange(index, "-", newest, count=count))
        if not entries:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for _entry_id, fields in entries:
                pipe.exists(keys.order(fields.get("id", "")))
            alive = cast(list[int], await pipe.execute())
        gone = [entry_id for (entry_id, _fields), exists in zip(entries, alive, strict=True) if not exists]
        if gone:
            await self.redis.xdel(index, *gone)
        return len(gone)

    async def count_attempt(self, order_id: str) -> int:
        """Count one more execution attempt of an order; the new count."""
        return int(await self.redis.hincrby(keys.order(order_id), "attempts", 1))

    async def begin_attempt(self, order_id: str, max_attempts: int) -> tuple[Order | None, bool]:
        """Count an execution attempt of the order, unless it is finished or has had
        ``max_attempts`` already, and read it, in one step: (the order as it now is,
        or None for an unknown one; whether the attempt was counted). Safe to run
        twice like every hot path script: a copy re-sent after a lost connection
        counts nothing more and answers as the first run did."""
        counted, flat = await self._begin_attempt(
            keys=[keys.order(order_id)], args=[max_attempts, secrets.token_hex(8)]
        )
        if not flat:
            return None, False
        return Order.from_hash(field_values(flat)), bool(counted)

    async def history(self, order_id: str, after_seq: int = 0) -> list[tuple[int, str]]:
        """Every status message of an order with seq > ``after_seq``: (seq, JSON text)."""
        entries = await self.hot.xrange(keys.order_events(order_id))
        out = []
        for _entry_id, fields in entries:
            seq = int(fields["seq"])
            if seq > after_seq:
                out.append((seq, fields["data"]))
        return out
