"""After a fault: read Redis and count what went wrong, order by order.

"Executed once" is checked on the simulated venues' ledger (``ledger:{tx_hash}``
hashes, see engine/execution/venues/simulated.py): an order executed once has exactly one ledger entry
(one transaction, so one trade), that entry is the order's own ``tx_hash``, and its
outcome is the order's (``confirmed`` with the same execution price, or ``reverted``
for an order that failed after sending). Sending the same transaction twice does not
execute it twice (the ledger records a tx_hash once) but is counted apart, in
``duplicate_sends``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from engine.core import amounts, keys

PATH = ("pending", "routing", "building", "submitted")
TERMINAL = ("confirmed", "failed")
_CHUNK = 200


def valid_path(statuses: list[str]) -> bool:
    """pending -> routing -> building -> submitted -> confirmed, or a prefix of it
    ending in failed: each status once, in order, ending in a terminal one."""
    if not statuses or statuses[-1] not in TERMINAL:
        return False
    head = statuses[:-1]
    if list(PATH[: len(head)]) != head:
        return False
    return statuses[-1] == "failed" or len(head) == len(PATH)


@dataclasses.dataclass
class Audit:
    """What the audit found; every list names the orders concerned."""

    orders: int = 0
    confirmed: int = 0
    failed: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)  # no order hash
    unfinished: list[str] = dataclasses.field(default_factory=list)  # not terminal
    bad_history: list[str] = dataclasses.field(default_factory=list)  # seq or status wrong
    executed_twice: list[str] = dataclasses.field(default_factory=list)  # > 1 ledger entry
    not_executed: list[str] = dataclasses.field(default_factory=list)  # confirmed, no trade
    ledger_mismatch: list[str] = dataclasses.field(default_factory=list)
    ledger_entries: int = 0
    duplicate_sends: int = 0
    stray_ledger_entries: int = 0  # for orders the audit was not asked about
    pending_entries: int = 0  # XPENDING of the consumer group
    queue_length: int = 0  # XLEN orders:new
    dead_letters: int = 0

    @property
    def lost(self) -> int:
        return len(self.missing) + len(self.unfinished)

    def problems(self) -> dict[str, Any]:
        """Every non-empty finding: {} when all is well."""
        found: dict[str, Any] = {}
        for name in ("missing", "unfinished", "bad_history", "executed_twice",
                     "not_executed", "ledger_mismatch"):
            orders = getattr(self, name)
            if orders:
                found[name] = orders[:10]
        for name in ("duplicate_sends", "pending_entries", "queue_length"):
            if getattr(self, name):
                found[name] = getattr(self, name)
        return found

    def figures(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "confirmed": self.confirmed,
            "failed": self.failed,
            "lost": self.lost,
            "bad_history": len(self.bad_history),
            "executed_twice": len(self.executed_twice),
            "not_executed": len(self.not_executed),
            "ledger_mismatch": len(self.ledger_mismatch),
            "ledger_entries": self.ledger_entries,
            "duplicate_sends": self.duplicate_sends,
            "pending_entries": self.pending_entries,
            "queue_length": self.queue_length,
            "dead_letters": self.dead_letters,
        }


async def ledger_by_order(redis: Redis) -> dict[str, list[dict[str, str]]]:
    """Every ledger entry, by the order it belongs to."""
    ledger_keys = [key async for key in redis.scan_iter(match=keys.ledger("*"), count=1000)]
    by_order: dict[str, list[dict[str, str]]] = defaultdict(list)
    for start in range(0, len(ledger_keys), _CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for key in ledger_keys[start : start + _CHUNK]:
                pipe.hgetall(key)
            for record in await pipe.execute():
                if record:
                    by_order[record["order_id"]].append(record)
    return by_order


async def histories(redis: Redis, order_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every order's status messages, from its own event stream."""
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(order_ids), _CHUNK):
        chunk = order_ids[start : start + _CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for order_id in chunk:
                pipe.xrange(keys.order_events(order_id))
            for order_id, entries in zip(chunk, await pipe.execute(), strict=True):
                out[order_id] = [json.loads(fields["data"]) for _id, fields in entries]
    return out


async def statuses_now(redis: Redis, order_ids: list[str]) -> dict[str, str]:
    """Each order's current status ("" for an unknown order)."""
    out: dict[str, str] = {}
    for start in range(0, len(order_ids), _CHUNK):
        chunk = order_ids[start : start + _CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for order_id in chunk:
                pipe.hget(keys.order(order_id), "status")
            for order_id, status in zip(chunk, await pipe.execute(), strict=True):
                out[order_id] = status or ""
    return out


async def count_unfinished(redis: Redis, order_ids: list[str]) -> int:
    current = await statuses_now(redis, order_ids)
    return sum(1 for status in current.values() if status not in TERMINAL)


async def group_pending(redis: Redis) -> int:
    """Entries delivered to a worker and not yet acknowledged."""
    try:
        summary = await redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
    except Exception as exc:  # noqa: BLE001 - NOGROUP before any worker started
        if "NOGROUP" in str(exc):
            return 0
        raise
    return int(summary["pending"])


async def audit(redis: Redis, order_ids: Iterable[str]) -> Audit:
    """Check every order in ``order_ids`` and the queue; see the module docstring."""
    ids = list(dict.fromkeys(order_ids))
    result = Audit(orders=len(ids))
    hashes: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for order_id in chunk:
                pipe.hgetall(keys.order(order_id))
            for order_id, stored in zip(chunk, await pipe.execute(), strict=True):
                hashes[order_id] = stored
    events = await histories(redis, ids)
    ledger = await ledger_by_order(redis)

    for order_id in ids:
        stored = hashes[order_id]
        if not stored:
            result.missing.append(order_id)
            continue
        status = stored["status"]
        if status == "confirmed":
            result.confirmed += 1
        elif status == "failed":
            result.failed += 1
        else:
            result.unfinished.append(order_id)
        messages = events[order_id]
        seqs = [m["seq"] for m in messages]
        statuses = [m["status"] for m in messages]
        if (
            seqs != list(range(1, len(messages) + 1))
            or int(stored["seq"]) != len(messages)
            or (status in TERMINAL and not valid_path(statuses))
            or (messages and statuses[-1] != status)
            or len(set(statuses)) != len(statuses)
        ):
            result.bad_history.append(order_id)
        _check_ledger(result, order_id, stored, ledger.get(order_id, []))

    wanted = set(ids)
    result.stray_ledger_entries = sum(len(v) for k, v in ledger.items() if k not in wanted)
    result.pending_entries = await group_pending(redis)
    result.queue_length = int(await redis.xlen(keys.ORDERS_STREAM))
    result.dead_letters = int(await redis.xlen(keys.DEAD_LETTER_STREAM))
    return result


def _check_ledger(
    result: Audit, order_id: str, stored: dict[str, str], entries: list[dict[str, str]]
) -> None:
    result.ledger_entries += len(entries)
    result.duplicate_sends += sum(int(e.get("duplicate_sends", 0)) for e in entries)
    if len(entries) > 1:
        result.executed_twice.append(order_id)
        return
    status = stored["status"]
    if not entries:
        if status == "confirmed":
            result.not_executed.append(order_id)
        return
    entry = entries[0]
    if entry["tx_hash"] != stored.get("tx_hash"):
        result.ledger_mismatch.append(order_id)
    elif status == "confirmed":
        # The ledger has what the venue paid, in base units; the order, in whole tokens.
        token_out = amounts.token(json.loads(stored["request"])["token_out"])
        paid = token_out.to_base_units(Decimal(stored["amount_out"]))
        if entry["state"] != "confirmed" or int(entry["amount_out"]) != paid:
            result.ledger_mismatch.append(order_id)
    elif status == "failed" and entry["state"] != "reverted":
        # Reported failed, but the trade went through (or may yet): a lie to the user.
        result.ledger_mismatch.append(order_id)
