"""The pipelined connection (engine.core.pipelined) against a real Redis: replies reach
their callers in order, and every fault ends in a ConnectionError or the caller's own
timeout, never a wrong reply or a hang."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from tornado.ioloop import IOLoop

from engine.core import keys
from engine.core.config import Config
from engine.core.connections import connect_pipelined
from engine.core.pipelined import PipelinedRedis, Script, Unanswered
from engine.core.store import OrderStore
from engine.ops.redis_server import RedisServer, free_port
from tests.helpers import VALID_ORDER, eventually

ECHO_SCRIPT = Script("return {KEYS[1], ARGV[1]}")


def pipe_for(url: str, stall_secs: float = 1.5) -> PipelinedRedis:
    pipe = PipelinedRedis.for_url(url, connect_timeout=1.0, stall_secs=stall_secs)
    assert pipe is not None
    return pipe


@pytest.fixture
def pipe(config: Config, clean_redis: None, io_loop: IOLoop) -> Iterator[PipelinedRedis]:
    """A pipelined connection to the session's Redis, as the web and worker make it."""
    connection = connect_pipelined(config.redis_url or "", config)
    assert connection is not None
    yield connection
    io_loop.run_sync(connection.aclose)


@pytest.fixture
def lonely_pipe(lonely_redis: RedisServer, io_loop: IOLoop) -> Iterator[PipelinedRedis]:
    """A pipelined connection to a Redis of the test's own, with a 0.3 s watchdog."""
    connection = pipe_for(lonely_redis.url, stall_secs=0.3)
    yield connection
    io_loop.run_sync(connection.aclose)


async def test_concurrent_callers_each_get_their_own_reply(
    pipe: PipelinedRedis, redis: Redis) -> None:
    await redis.set("a-string", "x")

    async def call(i: int) -> Any:
        if i % 7 == 0:  # an error reply in the middle of the stream goes to its caller
            return await pipe.execute("HGET", "a-string", "field")
        return await pipe.execute("ECHO", f"reply-{i}")

    results = await asyncio.gather(*(call(i) for i in range(300)), return_exceptions=True)
    for i, result in enumerate(results):
        if i % 7 == 0:
            assert isinstance(result, ResponseError) and "WRONGTYPE" in str(result)
        else:
            assert result == f"reply-{i}"


async def test_create_over_the_pipe_stores_what_the_redis_py_path_stores(
    pipe: PipelinedRedis, config: Config, redis: Redis
) -> None:
    piped, plain = OrderStore(redis, config, pipe), OrderStore(redis, config)

    a = await piped.create("a", dict(VALID_ORDER), "key-a")
    b = await plain.create("b", dict(VALID_ORDER), "key-b")
    assert (a.outcome, b.outcome) == ("created", "created")
    stored_a, stored_b = await redis.hgetall(keys.order("a")), await redis.hgetall(keys.order("b"))
    assert stored_a and stored_b
    assert set(stored_a) == set(stored_b)
    assert stored_a["request"] == stored_b["request"]
    assert stored_a["status"] == "pending"
    assert [seq for seq, _ in await piped.history("a")] == [1]
    assert await redis.xlen(keys.ORDERS_STREAM) == 2
    # The idempotency outcomes come back over the pipe too.
    assert (await piped.create("a2", dict(VALID_ORDER), "key-a")).outcome == "replayed"
    other = {**VALID_ORDER, "amount": 2}
    conflict = await piped.create("a3", other, "key-a")
    assert (conflict.outcome, conflict.order_id) == ("conflict", "a")


async def test_a_script_redis_does_not_have_is_loaded_and_run(
    pipe: PipelinedRedis, redis: Redis
) -> None:
    await redis.script_flush()
    with pytest.raises(NoScriptError):
        await pipe.execute("EVALSHA", ECHO_SCRIPT.sha, 1, "k")
    assert await pipe.evalsha(ECHO_SCRIPT, ["k"], ["v"]) == ["k", "v"]
    assert await redis.script_exists(ECHO_SCRIPT.sha) == [True]


async def test_an_argument_that_cannot_be_sent_leaves_the_replies_in_step(
    pipe: PipelinedRedis,
) -> None:
    assert await pipe.execute("PING") == "PONG"
    with pytest.raises(TypeError):
        await pipe.execute("ECHO", None)  # type: ignore[arg-type]
    # Had the refused command left a waiter behind, each reply would now go to the
    # caller before: the ECHO would get the PING's reply and so on.
    assert await asyncio.gather(pipe.execute("PING"), pipe.execute("ECHO", "x")) == ["PONG", "x"]


async def test_a_cancelled_callers_reply_is_dropped_not_handed_to_the_next(
    pipe: PipelinedRedis, redis: Redis
) -> None:
    # BLPOP holds the connection for 0.3 s, then answers nil. Its caller gives up
    # first; the PING sent after it must get PONG, not the BLPOP's nil.
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", "empty-list", 0.3))
    await asyncio.sleep(0.05)
    ping = asyncio.ensure_future(pipe.execute("PING"))
    blocked.cancel()
    assert await ping == "PONG"
    assert blocked.cancelled()


async def _client_id(pipe: PipelinedRedis) -> int:
    return int(await pipe.execute("CLIENT", "ID"))


async def _blocked(pipe: PipelinedRedis) -> tuple[int, asyncio.Future[Any]]:
    """The connection's client id, and a BLPOP holding it for 5 s (sent already)."""
    first = await _client_id(pipe)
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", "empty-list", 5))
    await asyncio.sleep(0.05)
    return first, blocked


async def test_a_killed_connection_fails_its_waiters_and_the_next_command_reconnects(
    pipe: PipelinedRedis, redis: Redis
) -> None:
    first, waiting = await _blocked(pipe)
    await redis.client_kill_filter(_id=first)
    with pytest.raises(RedisConnectionError, match="lost"):
        await asyncio.wait_for(waiting, 2)
    assert await _client_id(pipe) != first  # a new connection


async def test_evalsha_is_sent_again_once_when_its_connection_dies(
    pipe: PipelinedRedis, redis: Redis
) -> None:
    # Queue the script behind a blocked command, then kill the connection: the
    # script's fate is unknown, so it is sent again on a new connection.
    first, blocked = await _blocked(pipe)
    script = asyncio.ensure_future(pipe.evalsha(ECHO_SCRIPT, ["k"], ["again"]))
    await asyncio.sleep(0.05)
    await redis.client_kill_filter(_id=first)
    assert await asyncio.wait_for(script, 2) == ["k", "again"]
    with pytest.raises(RedisConnectionError):
        await blocked


async def test_a_reply_to_no_command_drops_the_connection(
    pipe: PipelinedRedis, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # After SUBSCRIBE, Redis pushes messages nobody sent a command for: the
    # connection can no longer pair replies with callers, so it must go.
    first = await _client_id(pipe)
    assert await pipe.execute("SUBSCRIBE", "news") == ["subscribe", "news", 1]
    await redis.publish("news", "unasked")
    await eventually(lambda: pipe._connection is None, timeout=2, message="connection dropped")
    assert "a reply to no command" in caplog.text
    assert await _client_id(pipe) != first


async def test_a_refused_connection_is_a_prompt_connection_error() -> None:
    pipe = pipe_for(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await asyncio.wait_for(pipe.execute("PING"), 2)
    with pytest.raises(RedisConnectionError):  # and again: no stuck connect attempt
        await asyncio.wait_for(pipe.evalsha(ECHO_SCRIPT, ["k"], ["v"]), 2)


async def test_a_frozen_redis_times_callers_out_and_the_watchdog_drops_the_socket(
    lonely_redis: RedisServer, lonely_pipe: PipelinedRedis
) -> None:
    pipe = lonely_pipe
    assert lonely_redis.process is not None
    pid = lonely_redis.process.pid

    first = await _client_id(pipe)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await pipe.execute("PING")
        # The watchdog sees no reply for 0.3 s with a command waiting, and drops
        # the connection (it fires 0.3 to 0.6 s after the PING was sent).
        await eventually(lambda: pipe._connection is None, timeout=2,
                         message="the stalled connection dropped")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await _client_id(pipe) != first


async def test_slow_replies_that_keep_coming_do_not_trip_the_watchdog(
    lonely_redis: RedisServer, lonely_pipe: PipelinedRedis
) -> None:
    pipe = lonely_pipe
    first = await _client_id(pipe)
    # Four 0.2 s blocks in a row: 0.8 s with a command always waiting, but a
    # reply every 0.2 s, so the connection is alive and must be kept.
    replies = await asyncio.gather(*(pipe.execute("BLPOP", "empty", 0.2) for _ in range(4)))
    assert replies == [None] * 4
    assert await _client_id(pipe) == first


async def test_user_password_and_database_come_from_the_url(lonely_redis: RedisServer) -> None:
    admin = Redis.from_url(lonely_redis.url, decode_responses=True)
    await admin.acl_setuser("svc", enabled=True, passwords=["+s3cret"], keys="*",
                            commands=["+@all"])
    pipe = pipe_for(f"redis://svc:s3cret@127.0.0.1:{lonely_redis.port}/3")
    wrong = pipe_for(f"redis://svc:nope@127.0.0.1:{lonely_redis.port}/3")

    try:
        assert await pipe.execute("SET", "where", "db3") == "OK"
        await admin.execute_command("SELECT", 3)
        assert await admin.get("where") == "db3"
        assert await pipe.execute("ACL", "WHOAMI") == "svc"
        with pytest.raises(RedisConnectionError):  # AuthenticationError is one
            await wrong.execute("PING")
    finally:
        await pipe.aclose()
        await wrong.aclose()
        await admin.aclose()


def test_it_runs_on_uvloop_as_the_server_does(config: Config, clean_redis: None) -> None:
    # The suite's own loop is asyncio's; the web process runs on uvloop, whose
    # transports are not asyncio.Transport subclasses.
    async def main() -> list[Any]:
        pipe = pipe_for(config.redis_url or "")
        try:
            return list(await asyncio.gather(
                pipe.execute("PING"), pipe.evalsha(ECHO_SCRIPT, ["k"], ["v"])))
        finally:
            await pipe.aclose()

    assert uvloop.run(main()) == ["PONG", ["k", "v"]]


def test_tls_urls_are_left_to_redis_py() -> None:
    for url in ("rediss://:pw@example.invalid:6380/0", "REDISS://example.invalid:6380"):
        assert PipelinedRedis.for_url(url, connect_timeout=1, stall_secs=1) is None
    unix = PipelinedRedis.for_url("unix:///tmp/redis.sock?db=2", connect_timeout=1, stall_secs=1)
    assert unix is not None and (unix.path, unix.db) == ("/tmp/redis.sock", 2)


async def test_commands_queued_in_one_pass_of_the_loop_go_out_in_one_write(
    pipe: PipelinedRedis,
) -> None:
    await pipe.execute("PING")  # connected
    connection = pipe._connection
    assert connection is not None and connection.transport is not None
    writes: list[bytes] = []

    class Counted:  # the transport, its writes recorded (uvloop's own cannot be patched)
        def __init__(self, real: Any) -> None:
            self.real = real

        def write(self, data: bytes) -> None:
            writes.append(data)
            self.real.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    connection.transport = Counted(connection.transport)  # type: ignore[assignment]
    replies = await asyncio.gather(*(pipe.execute("ECHO", str(i)) for i in range(50)))
    assert replies == [str(i) for i in range(50)]  # each caller its own reply, in order
    assert len(writes) == 1 and writes[0].count(b"ECHO") == 50


async def test_a_command_lost_before_its_write_is_known_not_to_have_run(
    pipe: PipelinedRedis, redis: Redis
) -> None:
    # The connection dies in the same pass of the loop as the command is queued:
    # it was never written, so its caller learns it certainly did not run.
    await pipe.execute("PING")
    connection = pipe._connection
    assert connection is not None and connection.transport is not None
    unanswered = Unanswered()
    sent = asyncio.ensure_future(pipe.execute("SET", "unsent", "1", unanswered=unanswered))
    await asyncio.sleep(0)  # queued, not yet written
    connection.transport.abort()
    with pytest.raises(RedisConnectionError):
        await sent
    assert unanswered.count == 0
    assert await redis.get("unsent") is None


async def test_a_command_sent_while_the_connection_closes_goes_over_a_new_one(
    pipe: PipelinedRedis,
) -> None:
    # Between an abort (the watchdog's, a protocol error's) and connection_lost() the
    # old connection is closing: a command then must not fail on it (found by review).
    await pipe.execute("PING")
    connection = pipe._connection
    assert connection is not None and connection.transport is not None
    connection.transport.abort()
    async with asyncio.timeout(2):  # not wait_for: its task would start after connection_lost()
        assert await pipe.execute_idempotent("PING") == "PONG"
    assert pipe._connection is not connection
