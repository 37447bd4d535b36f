"""The orders stream's consumer group, as one consumer sees it: every Redis command
the consumer sends about entries (read, claim, count deliveries, acknowledge,
dead-letter). What to do with an entry is the consumer's business."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.core import keys
from engine.core.pipelined import HotPath

logger = logging.getLogger(__name__)

# The dead-letter stream is for an operator to read; keep it from growing forever.
DEAD_LETTER_MAXLEN = 100_000

# An entry as XREADGROUP/XAUTOCLAIM return it: (id, fields); a deleted entry claimed
# on Redis 6.2 comes back as (None, None).
Entry = tuple[Any, dict[str, str] | None]


# Acknowledge and delete an entry in one step. KEYS: the stream; ARGV: group, entry id.
_ACK_LUA = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""


class OrderGroup:
    """``keys.EXECUTORS_GROUP`` on ``keys.ORDERS_STREAM``, for consumer ``consumer``;
    the acknowledgement of each order's entry goes over ``hot`` (default: redis-py's
    ``redis``), the rest over ``redis``."""

    def __init__(self, redis: Redis, consumer: str, hot: HotPath | None = None) -> None:
        self.redis = redis
        self.consumer = consumer
        self._ack = (hot or HotPath(redis, None)).script(_ACK_LUA)

    async def ensure(self) -> None:
        """Create the group (and the stream) unless it exists."""
        try:
            await self.redis.xgroup_create(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, id="0", mkstream=True)
            logger.info("created consumer group %s on %s", keys.EXECUTORS_GROUP, keys.ORDERS_STREAM)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to ``count`` entries never delivered, waiting up to ``block_ms`` for one
        (None: not at all)."""
        response = await self.redis.xreadgroup(
            keys.EXECUTORS_GROUP, self.consumer, {keys.ORDERS_STREAM: ">"}, count=count, block=block_ms
        )
        return _stream_entries(response)

    async def read_own(self, after: str, count: int) -> list[Entry]:
        """Up to ``count`` of this consumer's own pending entries (delivered, never
        acknowledged) after id ``after`` ("0": from the first)."""
        response = await self.redis.xreadgroup(
            keys.EXECUTORS_GROUP, self.consumer, {keys.ORDERS_STREAM: after}, count=count
        )
        return _stream_entries(response)

    async def claim_idle(self, min_idle_ms: int, cursor: str, count: int) -> tuple[str, list[Entry]]:
        """XAUTOCLAIM up to ``count`` entries idle for ``min_idle_ms`` (their worker is
        gone) from ``cursor``: the next cursor ("0-0" once the scan is done) and the
        entries."""
        response = await self.redis.xautoclaim(
            keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, self.consumer,
            min_idle_time=min_idle_ms, start_id=cursor, count=count,
        )
        # Redis 6.2 answers [cursor, entries]; 7+ adds a list of deleted ids.
        return str(response[0]), list(response[1])

    async def deliveries(self, entry_id: str) -> int | None:
        """How many times the group delivered this entry; None if it is no longer
        pending (acknowledged since it was read: a claim that raced an XACK)."""
        rows = await self.redis.xpending_range(
            keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else None

    async def idle(self) -> bool:
        """Nothing pending in the whole group (burst mode's end)."""
        summary = await self.redis.xpending(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP)
        return int(summary["pending"]) == 0

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete the entry (its order is finished)."""
        # Deleting the entry with its acknowledgement keeps orders:new short without
        # ever trimming an entry that is still pending.
        await self._ack(keys=[keys.ORDERS_STREAM], args=[keys.EXECUTORS_GROUP, entry_id])

    async def dead_letter(
        self, entry_id: str, fields: Mapping[str, str], reason: str, deliveries: int
    ) -> None:
        """Set the entry aside on ``keys.DEAD_LETTER_STREAM`` with ``reason``, for an
        operator, and acknowledge it, in one step."""
        logger.warning("entry %s (order %s): dead-lettered: %s", entry_id, fields.get("id", "-"), reason)
        record = {
            "entry_id": entry_id,
            "order_id": fields.get("id", ""),
            "reason": reason,
            "deliveries": str(deliveries),
            "consumer": self.consumer,
            "fields": json.dumps(dict(fields), sort_keys=True),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.DEAD_LETTER_STREAM, record,  # type: ignore[arg-type]
                      maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(keys.ORDERS_STREAM, keys.EXECUTORS_GROUP, entry_id)
            pipe.xdel(keys.ORDERS_STREAM, entry_id)
            pipe.hincrby(keys.COUNTERS, "dead_letters", 1)
            await pipe.execute()


def _stream_entries(response: Any) -> list[Entry]:
    """The entries of an XREADGROUP answer (RESP2: [[stream, [(id, fields), ...]]])."""
    entries: list[Entry] = []
    for _stream, batch in response or ():
        entries.extend(batch)
    return entries
