"""A worker's lease: its consumer name in the group, and the entries it works on.

Two live processes must never share a consumer name (each would take the other's
pending entries for its own), and a worker must keep the entries it works on from
looking idle, or another worker claims them; it must also notice when one was claimed
all the same (it was frozen or partitioned past ``claim_idle_ms``), and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.core import keys
from engine.core.config import Config
from engine.core.connections import REDIS_DOWN_ERRORS, raise_if_cancelled
from engine.core.pipelined import HotPath
from engine.core.store import OWNED_BY_LUA

logger = logging.getLogger(__name__)

# After a Redis connection error, wait this long before trying again.
REDIS_RETRY_SECS = 1.0

# Removes a worker's record (keys.worker) only if it is still this process's.
_RELEASE_NAME_LUA = """
local record = redis.call('GET', KEYS[1])
if record and cjson.decode(record)['token'] == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Refresh the idle time of the entries this consumer still owns, and only those: an
# entry another worker has claimed (this one was frozen or partitioned past
# claim_idle_ms) is not taken back. Returns the ids this consumer no longer owns.
# KEYS: orders stream; ARGV: group, consumer, entry ids...
_KEEP_OWNED_LUA = OWNED_BY_LUA + """
local lost = {}
for i = 3, #ARGV do
  if owned_by(KEYS[1], ARGV[1], ARGV[i], ARGV[2]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


class ConsumerLease:
    """The consumer name ``name`` held by this process (a record under
    ``keys.worker(name)``, with a TTL), and the freshness of its entries. ``hot``:
    the path of the per-order ownership check (default: redis-py's ``redis``)."""

    def __init__(self, redis: Redis, config: Config, name: str, hot: HotPath | None = None) -> None:
        self.redis = redis
        self.config = config
        self.name = name
        # Marks this process's record: a restarted worker of the same name tells its
        # predecessor's record from its own.
        self._token = secrets.token_hex(8)
        # Run for every order (``owns``): over the pipelined connection when given.
        self._keep_owned = (hot or HotPath(redis, None)).script(_KEEP_OWNED_LUA)
        self._release = redis.register_script(_RELEASE_NAME_LUA)

    def record(self, in_flight: int) -> str:
        """This process's entry under keys.worker(name): alive, and how busy (JSON)."""
        return json.dumps({"in_flight": in_flight, "pid": os.getpid(), "token": self._token})

    async def acquire(self, stopping: asyncio.Event) -> None:
        """Wait until no other live process uses this name (or until ``stopping``).

        A unique name (the default) is free at once. A fixed one (WORKER_NAME, DYNO)
        may still be held by the process this one replaces: it lets go when it stops
        gracefully, or its record expires CLAIM_IDLE_MS after it died, the same wait
        after which its entries could be claimed anyway. Redis outages are waited out.
        """
        warned = False
        while not stopping.is_set():
            try:
                taken = await self.redis.set(
                    keys.worker(self.name), self.record(0), nx=True, px=self.config.claim_idle_ms
                )
                if taken:
                    return
                if not warned:
                    logger.warning(
                        "worker %s: another process of this name is alive, or stopped "
                        "less than %s ms ago; waiting until its record expires",
                        self.name, self.config.claim_idle_ms,
                    )
                    warned = True
                await _sleep_unless(stopping, min(1.0, self.config.claim_idle_ms / 1000))
            except REDIS_DOWN_ERRORS as exc:
                raise_if_cancelled()
                logger.warning("worker %s: Redis unavailable (%s); retrying in %s s",
                               self.name, exc, REDIS_RETRY_SECS)
                await _sleep_unless(stopping, REDIS_RETRY_SECS)

    async def release(self) -> None:
        """Let a successor of the same name start at once (only our own record)."""
        try:
            await self._release(keys=[keys.worker(self.name)], args=[self._token])
        except (*REDIS_DOWN_ERRORS, ResponseError) as exc:
            raise_if_cancelled()
            logger.warning("worker %s: could not remove its record: %s", self.name, exc)

    async def beat(self, entry_ids: list[str], ttl_ms: int) -> list[str]:
        """Refresh the record (alive, ``len(entry_ids)`` in flight, for ``ttl_ms``) and
        the entries still ours; the ids of those another worker has claimed. Raises
        what redis-py raises when Redis fails."""
        await self.redis.set(keys.worker(self.name), self.record(len(entry_ids)), px=ttl_ms)
        if not entry_ids:
            return []
        lost = await self._keep_owned(
            keys=[keys.ORDERS_STREAM], args=[keys.EXECUTORS_GROUP, self.name, *entry_ids]
        )
        return [str(entry_id) for entry_id in lost]

    async def owns(self, entry_id: str) -> bool:
        """Whether the entry is still this consumer's (refreshing it if so)."""
        lost = await self._keep_owned(
            keys=[keys.ORDERS_STREAM], args=[keys.EXECUTORS_GROUP, self.name, entry_id]
        )
        return not lost


async def _sleep_unless(event: asyncio.Event, secs: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), secs)
