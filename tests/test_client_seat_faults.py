"""Never twice from the client's seat (issue 12), against the real processes.

The inputs of the issue that need a real web process, a real redis-server and real
TCP (tests/test_client_seat.py has the others):

3. Redis stalled (SIGSTOP) across the request timeout, at several stall lengths: a
   503 ("retry") never hides an order; where the outcome cannot be known the answer
   is a 504 that says so, and a retry with the same Idempotency-Key makes exactly one
   order.
7. Early answers to large bodies (413, 415, 403, 404) reach a client that sends the
   whole body before reading, as Python's urllib does, never a connection reset.
10. A status socket whose client resets the connection right after sending the id
   leaves no error, no traceback and no leaked socket in the log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from engine.core import keys
from tests.faults import run_scenario, scaled
from tests.faults.clients import RawWebSocket, post_order
from tests.faults.cluster import Cluster, WebProcess, connections, start_web
from tests.faults.report import Figures
from tests.helpers import AUTH_HEADERS, TEST_KEY_ID, VALID_ORDER, eventually

pytestmark = pytest.mark.slow

SCENARIO_TIMEOUT_SECS = scaled(120, 600)


async def order_ids_in_redis(redis: Redis) -> set[str]:
    return {key.split(":")[1] async for key in redis.scan_iter(match="order:*")
            if not key.endswith(":events")}


# -- 3. a stalled Redis: no 503 over an order that exists ------------------------------------

# Around the web's 1.5 s Redis timeout (REDIS_TIMEOUT_SECS), and its create deadline
# 0.5 s before that: created in time (202), refused by the deadline (503), no answer
# in time (504).
STALLS_SECS = (0.3, 0.8, 1.2, 1.4, 1.6, 2.0, 3.0)


def test_a_stalled_redis_never_hides_an_order_behind_a_503(cluster: Cluster, figures: Figures) -> None:
    run_scenario(_stalls(cluster, figures), SCENARIO_TIMEOUT_SECS)


async def _stalls(cluster: Cluster, figures: Figures) -> None:
    async with connections(cluster) as (redis, http):
        web = await start_web(cluster, http)
        warm = await post_order(http, web.base_url, VALID_ORDER)  # the connection is up
        assert warm.code == 202, warm
        answers: dict[float, tuple[str, Any]] = {}
        assert cluster.redis.process is not None
        pid = cluster.redis.process.pid
        for stall in STALLS_SECS:
            key = str(uuid.uuid4())
            cluster.redis.process.send_signal(signal.SIGSTOP)
            try:
                posting = asyncio.ensure_future(
                    post_order(http, web.base_url, VALID_ORDER, {"Idempotency-Key": key})
                )
                await asyncio.sleep(stall)
            finally:
                cluster.redis.process.send_signal(signal.SIGCONT)
            answers[stall] = (key, await posting)
        assert pid == cluster.redis.process.pid
        await asyncio.sleep(0.5)  # any create still queued in Redis has run by now

        exists = await order_ids_in_redis(redis)
        assert warm.body["order_id"] in exists
        expected = {warm.body["order_id"]}
        codes: dict[str, int] = {}
        for stall, (key, answer) in answers.items():
            codes[f"{stall:g}s"] = answer.code
            assert answer.code in (202, 503, 504), (stall, answer)
            if answer.code == 202:
                expected.add(answer.body["order_id"])
            elif answer.code == 503:
                # "Retry" means nothing was created: no order, no trace of the key.
                assert answer.body["error"] == "unavailable" and answer.headers["Retry-After"] == "1"
                assert not await redis.exists(keys.idempotency(TEST_KEY_ID, key)), (stall, answer)
            else:
                assert answer.body["error"] == "outcome_unknown", answer
                assert "Retry-After" not in answer.headers
                # The answer names the order; asking for it settles the question, for good.
                order_id = answer.body["order_id"]
                first = await http.fetch(f"{web.base_url}/api/orders/{order_id}", raise_error=False,
                                         headers=AUTH_HEADERS)
                assert first.code in (200, 404), first
                if first.code == 200:
                    expected.add(order_id)
        assert exists == expected, (codes, exists - expected)
        # Both kinds happened: a deadline refusal (503) and an unknown outcome (504).
        assert 503 in codes.values() and 504 in codes.values(), codes

        # Each client does as its answer said: retry with the same key. One order each.
        for stall, (key, _answer) in answers.items():
            retry = await post_order(http, web.base_url, VALID_ORDER, {"Idempotency-Key": key})
            assert retry.code == 202, (stall, retry)
        assert len(await order_ids_in_redis(redis)) == 1 + len(STALLS_SECS)
        still = await asyncio.gather(*(
            http.fetch(f"{web.base_url}/api/orders/{answer.body['order_id']}", raise_error=False,
                       headers=AUTH_HEADERS)
            for _key, answer in answers.values() if answer.code == 504
        ))
        figures.record("redis_stall", {
            "stalls_secs": list(STALLS_SECS),
            "answers": codes,
            "orders_created_behind_a_503": 0,
            "orders_after_retries": len(await order_ids_in_redis(redis)),
            "intents": 1 + len(STALLS_SECS),
            "unknown_then_found": sum(r.code == 200 for r in still),
        })

        # A DELETE in a stall: never a "nothing was done" over a cancel that happened.
        cancel_me = await post_order(http, web.base_url, VALID_ORDER)
        cluster.redis.process.send_signal(signal.SIGSTOP)
        try:
            deleting = asyncio.ensure_future(http.fetch(
                f"{web.base_url}/api/orders/{cancel_me.body['order_id']}", method="DELETE",
                raise_error=False, headers=AUTH_HEADERS,
            ))
            await asyncio.sleep(2.0)
        finally:
            cluster.redis.process.send_signal(signal.SIGCONT)
        deleted = await deleting
        # The DELETE is two steps: the key's check, then the cancel. A stall in the
        # first is a 503, and then nothing was cancelled; in the second a 504: perhaps.
        assert deleted.code in (503, 504), deleted
        status = await redis.hget(keys.order(cancel_me.body["order_id"]), "status")
        if deleted.code == 503:
            assert json.loads(deleted.body)["error"] == "unavailable"
            assert status == "pending"
        else:
            assert json.loads(deleted.body)["error"] == "outcome_unknown"
        again = await http.fetch(f"{web.base_url}/api/orders/{cancel_me.body['order_id']}",
                                 method="DELETE", raise_error=False, headers=AUTH_HEADERS)
        assert again.code == 200


# -- 7. early answers reach a client that sends its whole body first -------------------------


def _urllib_post(url: str, body: bytes | Iterator[bytes], headers: dict[str, str]) -> tuple[int, Any]:
    """POST with urllib (it sends the whole body, then reads): (status, JSON body);
    (0, the error) when the connection was reset before an answer could be read."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())
    except (ConnectionError, urllib.error.URLError) as exc:
        return 0, repr(exc)


BIG = b'{"token_in": "SOL", "pad": "' + b"x" * (1_100_000) + b'"}'  # 1.1 MB, as in the issue
TRIES = scaled(12, 60)


def _chunks() -> Iterator[bytes]:
    for start in range(0, len(BIG), 64 * 1024):
        yield BIG[start : start + 64 * 1024]


EARLY_ANSWERS = {
    # name: (path, body, headers, status, error)
    "over_server_limit": ("/api/orders/execute", BIG, {"Content-Type": "application/json"}, 413, "body_too_large"),
    "over_order_limit": ("/api/orders/execute", BIG[:200_000], {"Content-Type": "application/json"}, 413,
                         "body_too_large"),
    "chunked": ("/api/orders/execute", None, {"Content-Type": "application/json",
                                              "Transfer-Encoding": "chunked"}, 413, "body_too_large"),
    "not_json": ("/api/orders/execute", BIG, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    "foreign_origin": ("/api/orders/execute", BIG, {"Content-Type": "application/json",
                                                    "Origin": "https://evil.example"}, 403, "origin_not_allowed"),
    "unknown_path": ("/api/nothing/here", BIG[:500_000], {"Content-Type": "application/json"}, 404, "not_found"),
    # No API key: refused before the body is read, like the others.
    "no_key": ("/api/orders/execute", BIG, {"Content-Type": "application/json", "Authorization": ""}, 401,
               "unauthorized"),
}


def test_an_early_answer_to_a_large_body_reaches_the_client(cluster: Cluster, figures: Figures) -> None:
    run_scenario(_early_answers(cluster, figures), SCENARIO_TIMEOUT_SECS)


async def _early_answers(cluster: Cluster, figures: Figures) -> None:
    async with connections(cluster) as (_redis, http):
        web = await start_web(cluster, http)
        tally: dict[str, dict[str, int]] = {}
        for name, (path, body, headers, status, error) in EARLY_ANSWERS.items():
            got: dict[str, int] = {}
            for _ in range(TRIES):
                sent = {**AUTH_HEADERS, **headers}  # the case's own Authorization ("": none) wins
                sent = {name: value for name, value in sent.items() if value}
                code, answer = await asyncio.to_thread(
                    _urllib_post, web.base_url + path, body if body is not None else _chunks(), sent
                )
                got[str(code)] = got.get(str(code), 0) + 1
                assert (code, answer["error"] if code else answer) == (status, error), (name, code, answer)
            tally[name] = got
        # The web process is fine afterwards, and logged no error.
        assert (await http.fetch(f"{web.base_url}/healthz")).code == 200
        assert " ERROR " not in web.log_text() and "Traceback" not in web.log_text(), web.output()
        figures.record("early_answers", {"tries_per_case": TRIES, "answers": tally, "resets": 0})


# -- 10. a client that resets its status socket ----------------------------------------------

RESETS = scaled(60, 400)


def test_a_client_that_resets_its_status_socket_leaves_no_error(cluster: Cluster, figures: Figures) -> None:
    run_scenario(_resets(cluster, figures), SCENARIO_TIMEOUT_SECS)


def _reset(raw: RawWebSocket) -> None:
    """Abort the TCP connection with a RST (SO_LINGER 0), as a killed client's kernel would."""
    sock: socket.socket = raw.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.writer.transport.abort()


async def _resets(cluster: Cluster, figures: Figures) -> None:
    async with connections(cluster) as (_redis, http):
        web: WebProcess = await start_web(cluster, http)
        # A pending order (no worker): its history is sent as soon as the id arrives.
        order = await post_order(http, web.base_url, VALID_ORDER)
        for i in range(RESETS):
            raw = await RawWebSocket.connect(web.ws_url)
            await raw.send_text(order.body["order_id"])
            if i % 2:
                await asyncio.sleep(0.001 * (i % 7))  # land at different points of the send
            _reset(raw)

        async def all_closed() -> bool:
            metrics = (await http.fetch(f"{web.base_url}/metrics")).body.decode()
            return "websockets_open 0.0" in metrics

        await eventually(all_closed, timeout=20, message="every reset socket closed")
        await asyncio.sleep(0.5)  # an unretrieved task is reported when it is collected
        log = web.log_text()
        assert "never retrieved" not in log and "Traceback" not in log, web.output(8000)
        assert " ERROR " not in log, web.output(8000)
        figures.record("status_socket_resets", {"resets": RESETS, "errors_logged": 0})
