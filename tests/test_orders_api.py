"""POST /api/orders/execute and GET /api/orders/{id}: validation, storage, idempotency."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.web import Application

from engine.core import keys
from engine.core.store import Recorded
from engine.web.schemas import Schemas
from handlers.orders import ExecuteOrderHandler, ExecuteOrderRouter, StreamedExecuteOrderHandler
from tests.faults.clients import raw_http
from tests.helpers import TEST_KEY_ID, VALID_ORDER, post_chunked, post_order


def with_(**changes: Any) -> dict[str, Any]:
    order = dict(VALID_ORDER)
    for name, value in changes.items():
        if value is ...:
            del order[name]
        else:
            order[name] = value
    return order


async def test_valid_order_is_accepted_stored_and_queued(
    http_server_client: Any, redis: Redis, schemas: Schemas
) -> None:
    response, body = await post_order(http_server_client)
    assert response.code == 202
    assert schemas.errors("order_accepted", body) == []
    order_id = body["order_id"]
    assert uuid.UUID(order_id).version == 4
    assert response.headers["Location"] == f"/api/orders/{order_id}"
    assert response.headers["Content-Type"] == "application/json"

    stored = await redis.hgetall(keys.order(order_id))
    assert stored["status"] == "pending"
    assert json.loads(stored["request"]) == VALID_ORDER
    queued = await redis.xrange(keys.ORDERS_STREAM)
    assert [fields["id"] for _id, fields in queued] == [order_id]
    events = await redis.xrange(keys.order_events(order_id))
    assert len(events) == 1
    first = json.loads(events[0][1]["data"])
    assert first["status"] == "pending" and first["seq"] == 1
    assert schemas.errors("status_message", first) == []


@pytest.mark.parametrize("slippage", [0.01, 0.5, 0.25])
async def test_slippage_bounds_are_inclusive(http_server_client: Any, slippage: float) -> None:
    response, _ = await post_order(http_server_client, with_(max_slippage=slippage))
    assert response.code == 202


@pytest.mark.parametrize(
    ("order", "field", "fragment"),
    [
        (with_(max_slippage=0.009), "max_slippage", "must be between 0.01 and 0.5"),
        (with_(max_slippage=0.51), "max_slippage", "must be between 0.01 and 0.5"),
        (with_(max_slippage=-1), "max_slippage", "must be between 0.01 and 0.5"),
        (with_(max_slippage="0.05"), "max_slippage", "must be a number"),
        (with_(max_slippage=...), "max_slippage", "is required"),
        (with_(amount=0), "amount", "greater than 0"),
        (with_(amount=-3), "amount", "greater than 0"),
        (with_(amount=1e10), "amount", "at most 1000000000"),
        (with_(amount=True), "amount", "must be a number"),
        (with_(amount=None), "amount", "must be a number"),
        (with_(amount="12.5"), "amount", "must be a number"),
        (with_(amount=...), "amount", "is required"),
        (with_(token_in="DOGE"), "token_in", "'DOGE' is not supported"),
        (with_(token_out="usdc"), "token_out", "'usdc' is not supported"),
        (with_(token_in=7), "token_in", "must be a string"),
        (with_(token_out="SOL"), "token_out", "must be different from token_in"),
        (with_(token_in=...), "token_in", "is required"),
        (with_(order_type="limit"), "order_type", "'limit' is not supported; use one of: market"),
        (with_(order_type="sniper"), "order_type", "not supported"),
        (with_(order_type=...), "order_type", "is required"),
        (with_(price=220), "price", "is not a known field"),
    ],
)
async def test_invalid_order_is_a_400_naming_the_field(
    http_server_client: Any, redis: Redis, schemas: Schemas, order: Any, field: str, fragment: str
) -> None:
    response, body = await post_order(http_server_client, order)
    assert response.code == 400
    assert schemas.errors("error", body) == []
    assert body["error"] == "invalid_order"
    matching = [d for d in body["details"] if d["field"] == field]
    assert matching, body
    assert any(fragment in d["message"] for d in matching), body
    assert await redis.xlen(keys.ORDERS_STREAM) == 0


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"token_in":"SOL","token_out":"USDC","amount":NaN,"order_type":"market","max_slippage":0.05}', "NaN"),
        (b'{"token_in":"SOL","token_out":"USDC","amount":Infinity,"order_type":"market","max_slippage":0.05}', "Infinity"),
        (b'{"token_in":"SOL","token_out":"USDC","amount":-Infinity,"order_type":"market","max_slippage":0.05}', "Infinity"),
        # 1e999 is JSON, read exactly (then refused by the schema's maximum); an
        # exponent beyond what a decimal number can hold is not.
        (b'{"token_in":"SOL","token_out":"USDC","amount":1e99999999999999999999,"order_type":"market","max_slippage":0.05}', "out of range"),
        (b'{"token_in":"SOL","token_in":"BONK","token_out":"USDC","amount":1,"order_type":"market","max_slippage":0.05}', "duplicate key 'token_in'"),
        (b'{"token_in":"SOL"', "Expecting"),
        (b"", "Expecting value"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"token_in":"SOL\xc3"}', "UTF-8"),
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b"1" * 5000, "could not be decoded"),
        (b"[" * 5000 + b"]" * 5000, "could not be decoded"),
    ],
)
async def test_bodies_that_are_not_strict_json_are_400(
    http_server_client: Any, schemas: Schemas, raw: bytes, fragment: str
) -> None:
    response, body = await post_order(http_server_client, raw=raw)
    assert response.code == 400, body
    assert body["error"] == "invalid_json"
    assert fragment in body["message"]
    assert schemas.errors("error", body) == []


@pytest.mark.parametrize("document", [[VALID_ORDER], "SOL", 12.5, None, True])
async def test_non_object_bodies_are_400(http_server_client: Any, document: Any) -> None:
    response, body = await post_order(http_server_client, raw=json.dumps(document).encode())
    assert response.code == 400
    assert body["error"] == "invalid_order"
    assert body["details"] == [{"field": "", "message": "the request body must be a JSON object"}]


async def test_large_integers_are_range_checked_not_crashed(http_server_client: Any) -> None:
    raw = json.dumps(with_(amount=1)).replace('"amount": 1', '"amount": ' + "9" * 400).encode()
    response, body = await post_order(http_server_client, raw=raw)
    assert response.code == 400
    assert body["details"][0]["field"] == "amount"


async def test_body_over_16_kib_is_413(http_server_client: Any, redis: Redis) -> None:
    padded = json.dumps(VALID_ORDER) + " " * (16 * 1024)
    response, body = await post_order(http_server_client, raw=padded.encode())
    assert response.code == 413
    assert body["error"] == "body_too_large"
    assert await redis.xlen(keys.ORDERS_STREAM) == 0


async def test_body_of_exactly_16_kib_is_read(http_server_client: Any) -> None:
    text = json.dumps(VALID_ORDER)
    padded = text + " " * (16 * 1024 - len(text))
    response, _ = await post_order(http_server_client, raw=padded.encode())
    assert response.code == 202


async def test_chunked_body_over_the_limit_is_413(http_server_client: Any) -> None:
    response = await post_chunked(http_server_client, [b" " * 1024] * 20)
    assert response.code == 413
    assert json.loads(response.body)["error"] == "body_too_large"


async def test_chunked_body_within_the_limit_is_accepted(http_server_client: Any, redis: Redis) -> None:
    text = json.dumps(VALID_ORDER).encode()
    response = await post_chunked(
        http_server_client, [text[start : start + 10] for start in range(0, len(text), 10)]
    )
    assert response.code == 202
    order_id = json.loads(response.body)["order_id"]
    assert json.loads((await redis.hgetall(keys.order(order_id)))["request"]) == VALID_ORDER


@pytest.mark.parametrize(
    "length", [b"\xb2", b"9" * 4400, b"1e3", b"0x10"], ids=["superscript_two", "huge", "float", "hex"]
)
async def test_a_content_length_that_is_not_a_number_is_a_json_400(
    http_server_client: Any, length: bytes
) -> None:
    port = int(http_server_client.get_url("").rsplit(":", 1)[1].strip("/"))
    request = (
        b"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n{}"
    )
    status, head, body = await raw_http("127.0.0.1", port, request)
    assert status == 400, head
    assert json.loads(body)["error"] == "bad_request"


@pytest.mark.parametrize(
    ("headers", "handler"),
    [
        ({"Content-Length": "95", "Content-Type": "application/json"}, ExecuteOrderHandler),
        ({"Content-Length": "95"}, ExecuteOrderHandler),
        ({"Content-Length": "95", "Content-Type": "application/vnd.x+json"}, ExecuteOrderHandler),
        ({"Content-Length": str(16 * 1024)}, ExecuteOrderHandler),
        ({"Content-Length": str(16 * 1024 + 1)}, StreamedExecuteOrderHandler),
        ({"Transfer-Encoding": "chunked"}, StreamedExecuteOrderHandler),
        ({"Content-Length": "95", "Content-Type": "multipart/form-data; boundary=x"},
         StreamedExecuteOrderHandler),
        ({"Content-Length": "+95"}, StreamedExecuteOrderHandler),
        ({"Content-Length": "\xb2"}, StreamedExecuteOrderHandler),
    ],
)
def test_only_json_bodies_declared_within_the_limit_are_read_whole(
    app: Application, headers: dict[str, str], handler: type
) -> None:
    router = app.wildcard_router.rules[0].target
    assert isinstance(router, ExecuteOrderRouter)
    request = HTTPServerRequest(
        start_line=RequestStartLine("POST", "/api/orders/execute", "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "localhost", **headers}),
    )
    delegate = router.find_handler(request)
    assert getattr(delegate, "handler_class", None) is handler


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
async def test_non_json_content_type_is_415(http_server_client: Any, content_type: str) -> None:
    response, body = await post_order(http_server_client, headers={"Content-Type": content_type})
    assert response.code == 415
    assert body["error"] == "unsupported_media_type"


async def test_json_content_type_with_charset_is_accepted(http_server_client: Any) -> None:
    response, _ = await post_order(
        http_server_client, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.code == 202


async def test_same_idempotency_key_and_body_returns_the_same_order(
    http_server_client: Any, redis: Redis
) -> None:
    headers = {"Idempotency-Key": "client-42"}
    first, body1 = await post_order(http_server_client, headers=headers)
    # The same order, its keys in another order: the same request.
    reordered = dict(reversed(list(VALID_ORDER.items())))
    second, body2 = await post_order(http_server_client, reordered, headers=headers)
    assert first.code == second.code == 202
    assert body1 == body2
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await redis.xlen(keys.ORDERS_STREAM) == 1
    assert 0 < await redis.ttl(keys.idempotency(TEST_KEY_ID, "client-42")) <= 24 * 3600


async def test_same_idempotency_key_with_another_body_is_422(
    http_server_client: Any, redis: Redis
) -> None:
    headers = {"Idempotency-Key": "client-43"}
    first, body1 = await post_order(http_server_client, headers=headers)
    second, body2 = await post_order(http_server_client, with_(amount=99), headers=headers)
    assert second.code == 422
    assert body2["error"] == "idempotency_key_reused"
    assert body2["order_id"] == body1["order_id"]
    assert await redis.xlen(keys.ORDERS_STREAM) == 1


async def test_concurrent_duplicates_create_exactly_one_order(
    http_server_client: Any, redis: Redis
) -> None:
    headers = {"Idempotency-Key": "burst-1"}
    results = await asyncio.gather(
        *(post_order(http_server_client, headers=headers) for _ in range(25))
    )
    assert {response.code for response, _ in results} == {202}
    assert len({body["order_id"] for _, body in results}) == 1
    assert await redis.xlen(keys.ORDERS_STREAM) == 1
    assert len(await redis.keys("order:*:events")) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "caf\u00e9"])
async def test_malformed_idempotency_key_is_400(http_server_client: Any, key: str) -> None:
    response = await http_server_client.fetch(
        "/api/orders/execute",
        method="POST",
        body=json.dumps(VALID_ORDER).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        raise_error=False,
    )
    assert response.code == 400
    assert json.loads(response.body)["error"] == "invalid_idempotency_key"


async def test_get_order_returns_state_and_history(
    http_server_client: Any, schemas: Schemas
) -> None:
    _, accepted = await post_order(http_server_client)
    response = await http_server_client.fetch(f"/api/orders/{accepted['order_id']}")
    body = json.loads(response.body)
    assert response.code == 200
    assert schemas.errors("order", body) == []
    assert body["order_id"] == accepted["order_id"]
    assert body["status"] == "pending"
    assert body["request"] == VALID_ORDER
    assert [m["status"] for m in body["history"]] == ["pending"]


@pytest.mark.parametrize("path", [f"/api/orders/{uuid.uuid4()}", "/api/orders/not-an-id"])
async def test_get_unknown_order_is_404_json(http_server_client: Any, path: str) -> None:
    response = await http_server_client.fetch(path, raise_error=False)
    assert response.code == 404
    assert json.loads(response.body)["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/nowhere", 404),
        ("GET", "/api/orders/execute", 405),
        ("PUT", "/api/orders/execute", 405),
        ("DELETE", "/healthz", 405),
    ],
)
async def test_unknown_paths_and_methods_are_json(
    http_server_client: Any, schemas: Schemas, method: str, path: str, code: int
) -> None:
    body = b"{}" if method in ("PUT", "POST") else None
    response = await http_server_client.fetch(path, method=method, body=body, raise_error=False)
    assert response.code == code
    payload = json.loads(response.body)
    assert schemas.errors("error", payload) == []
    assert response.headers["Content-Type"] == "application/json"


async def test_health_and_readiness(http_server_client: Any) -> None:
    health = await http_server_client.fetch("/healthz")
    ready = await http_server_client.fetch("/readyz")
    assert json.loads(health.body) == {"status": "ok"}
    assert json.loads(ready.body) == {"status": "ready"}


async def test_cancel_a_pending_order(http_server_client: Any, redis: Redis, schemas: Schemas) -> None:
    _, accepted = await post_order(http_server_client)
    path = f"/api/orders/{accepted['order_id']}"
    for _ in range(2):  # a repeated DELETE gets the same answer
        response = await http_server_client.fetch(path, method="DELETE")
        assert response.code == 200
        assert schemas.errors("order_cancelled", json.loads(response.body)) == []
        assert json.loads(response.body) == {
            "order_id": accepted["order_id"], "status": "failed", "reason": "cancelled by client"
        }
    order = json.loads((await http_server_client.fetch(path)).body)
    assert [m["status"] for m in order["history"]] == ["pending", "failed"]
    assert order["history"][-1]["reason"] == "cancelled by client"
    assert schemas.errors("order", order) == []
    assert await redis.hget(keys.COUNTERS, "failed") == "1"


async def _advance_to(store: Any, order_id: str, reached: str) -> None:
    tx = "0x" + "cd" * 32
    path_so_far = {
        "routing": {},
        "building": {"venue": "raydium", "min_amount_out": 1.0},
        "submitted": {"tx_hash": tx},
        "confirmed": {"tx_hash": tx, "execution_price": 220.0},
    }
    for status, fields in path_so_far.items():
        assert (await store.transition(order_id, status, **fields)).applied
        if status == reached:
            break


@pytest.mark.parametrize("reached", ["routing", "building"])
async def test_cancel_before_the_transaction_is_recorded(
    http_server_client: Any, store: Any, reached: str
) -> None:
    _, accepted = await post_order(http_server_client)
    order_id = accepted["order_id"]
    await _advance_to(store, order_id, reached)
    response = await http_server_client.fetch(f"/api/orders/{order_id}", method="DELETE")
    assert response.code == 200
    assert (await store.get(order_id)).status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("reached", ["building+tx", "submitted", "confirmed"])
async def test_cancel_is_409_once_a_transaction_may_be_sent(
    http_server_client: Any, store: Any, reached: str
) -> None:
    _, accepted = await post_order(http_server_client)
    order_id = accepted["order_id"]
    await _advance_to(store, order_id, reached.removesuffix("+tx"))
    if reached == "building+tx":  # the worker recorded the tx it is about to send
        assert await store.record_tx(order_id, "0x" + "ab" * 32) is Recorded.RECORDED
    reached = reached.removesuffix("+tx")
    response = await http_server_client.fetch(
        f"/api/orders/{order_id}", method="DELETE", raise_error=False
    )
    assert response.code == 409
    body = json.loads(response.body)
    assert body["error"] == "too_late" and reached in body["message"]
    assert (await store.get(order_id)).status == reached  # type: ignore[union-attr]


async def test_cancel_an_unknown_order_is_404(http_server_client: Any) -> None:
    response = await http_server_client.fetch(
        f"/api/orders/{uuid.uuid4()}", method="DELETE", raise_error=False
    )
    assert response.code == 404


async def test_accepting_and_cancelling_an_order_are_logged_with_its_id(
    http_server_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="handlers.orders"):
        _, body = await post_order(http_server_client)
        order_id = body["order_id"]
        response = await http_server_client.fetch(f"/api/orders/{order_id}", method="DELETE")
    assert response.code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "handlers.orders"]
    assert lines == [
        f"order {order_id}: accepted -> pending",
        f"order {order_id}: cancelled by client -> failed",
    ]
