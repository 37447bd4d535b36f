"""Never twice from the client's seat (issue 12), against the in-process app.

Each numbered input of the issue is a test here, with its siblings (other headers,
other spellings of a number, other tokens, other endpoints); the ones that need
real processes (3, 7, 10) are in tests/test_client_seat_faults.py:

1. a repeated Idempotency-Key line, and every other header that may come once;
2. the same order with its numbers spelled differently replays;
4. amounts are exact: finer than a token's smallest unit is a 400, what is
   reported is exact in the token's decimals;
5. HEAD answers like GET, without a body, on every GET resource;
6. chunk extensions are ignored (RFC 9112 section 7.1.1), malformed HTTP gets JSON;
8. lone surrogates are invalid JSON, and no answer ever holds one;
9. a malformed Sec-WebSocket-Key is a JSON 400;
11. a state-changing request from a foreign Origin is a JSON 403.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from tornado.httpclient import AsyncHTTPClient
from tornado.httputil import HTTPHeaders
from tornado.testing import bind_unused_port

from engine.core import amounts, keys
from engine.core.config import Config
from engine.core.store import OrderStore
from engine.execution.services import build_worker
from engine.ops.redis_server import RedisServer, free_port
from engine.web.schemas import Schemas
from engine.web.services import Services
from server import make_app, make_http_server
from tests.faults.clients import raw_http
from tests.helpers import AUTH_HEADERS, TEST_API_KEY, TEST_KEY_ID, VALID_ORDER, post_order

ORDER_TEXT = (
    '{"token_in":"SOL","token_out":"USDC","amount":%s,"order_type":"market",'
    '"max_slippage":%s}'
)


def port_of(client: Any) -> int:
    return int(client.get_url("").rsplit(":", 1)[1].strip("/"))


async def post_text(
    client: Any, text: str | bytes, headers: dict[str, str] | HTTPHeaders | None = None
) -> tuple[int, dict[str, Any], Any]:
    """POST a body as it is; (status, headers, body decoded by a strict parser)."""
    all_headers = HTTPHeaders({"Content-Type": "application/json"})
    for name, value in (headers.get_all() if isinstance(headers, HTTPHeaders) else (headers or {}).items()):
        all_headers.add(name, value)
    response = await client.fetch(
        "/api/orders/execute", method="POST", raise_error=False,
        body=text if isinstance(text, bytes) else text.encode(), headers=all_headers,
    )
    # orjson is strict: it refuses lone surrogates, invalid UTF-8 and NaN.
    return response.code, dict(response.headers), orjson.loads(response.body)


async def order_count(redis: Redis) -> int:
    return len([k for k in await redis.keys("order:*") if not k.endswith(":events")])


# -- 1. one Idempotency-Key, sent once ------------------------------------------------------


@pytest.mark.parametrize("lines", [["K", "K"], ["K", "L"], ["K", '"K"']])
async def test_a_repeated_idempotency_key_line_is_400_and_creates_nothing(
    http_server_client: Any, redis: Redis, lines: list[str]
) -> None:
    headers = HTTPHeaders()
    for line in lines:
        headers.add("Idempotency-Key", line)
    code, _, body = await post_text(http_server_client, json.dumps(VALID_ORDER), headers)
    assert code == 400 and body["error"] == "invalid_idempotency_key", body
    assert await order_count(redis) == 0
    # The retry the client then makes, with the header once: one order, and only one.
    first, _, one = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": "K"})
    again, replayed, two = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": "K"})
    assert (first, again) == (202, 202) and one["order_id"] == two["order_id"]
    assert replayed["Idempotent-Replayed"] == "true"
    assert await order_count(redis) == 1


@pytest.mark.parametrize("key", ["K,K", "a, b", "K,", '"open', 'in"side', '""', '"bad\\x"'])
async def test_a_key_that_may_be_two_keys_or_is_malformed_is_400(
    http_server_client: Any, redis: Redis, key: str
) -> None:
    code, _, body = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": key})
    assert code == 400 and body["error"] == "invalid_idempotency_key", (key, body)
    assert await order_count(redis) == 0


async def test_a_quoted_key_is_the_same_key_as_the_bare_one(
    http_server_client: Any, redis: Redis
) -> None:
    # draft-ietf-httpapi-idempotency-key-header writes the key as a quoted string.
    _, _, bare = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": "k-1"})
    code, head, quoted = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": '"k-1"'})
    assert code == 202 and quoted["order_id"] == bare["order_id"]
    assert head["Idempotent-Replayed"] == "true"
    # Inside quotes a comma is part of the key (and escapes are undone).
    _, _, commas = await post_text(http_server_client, json.dumps(VALID_ORDER), {"Idempotency-Key": '"a,\\"b"'})
    assert await redis.get(keys.idempotency(TEST_KEY_ID, 'a,"b')) is not None
    assert commas["order_id"] != bare["order_id"]


@pytest.mark.parametrize("name", ["Content-Type", "Origin", "Host"])
async def test_any_header_that_may_come_once_sent_twice_is_a_json_400(
    http_server_client: Any, redis: Redis, name: str
) -> None:
    port = port_of(http_server_client)
    value = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}",
             "Host": f"127.0.0.1:{port}"}[name]
    body = json.dumps(VALID_ORDER).encode()
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
            "Content-Length": str(len(body))}
    head.pop(name, None)
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items()) + f"{name}: {value}\r\n" * 2
    request = f"POST /api/orders/execute HTTP/1.1\r\n{lines}\r\n".encode() + body
    status, _, answer = await raw_http("127.0.0.1", port, request)
    assert status == 400, answer
    error = json.loads(answer)
    assert error["error"] == "bad_request"
    if name == "Host":  # refused by Tornado as it reads the request (RFC 9112 3.2)
        assert "Multiple host headers" in error["message"], error
    else:
        assert error["message"] == f"the {name} header must be sent once"
    assert await order_count(redis) == 0


# -- 2. the same order, spelled differently ------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (ORDER_TEXT % ("2", "0.05"), ORDER_TEXT % ("2.0", "0.05")),
        (ORDER_TEXT % ("2", "0.05"), ORDER_TEXT % ("2e0", "5e-2")),
        (ORDER_TEXT % ("2", "0.05"), ORDER_TEXT % ("20E-1", "0.050000")),
        (ORDER_TEXT % ("12.5", "0.1"), ORDER_TEXT % ("1.25E+1", "0.10")),
        # Another key order, whitespace, and an escaped character: the same order.
        (ORDER_TEXT % ("3", "0.2"),
         '{ "max_slippage" : 0.2, "order_type": "m\\u0061rket", "amount": 3.000,'
         ' "token_out": "USDC", "token_in": "SOL" }'),
    ],
)
async def test_equal_orders_in_any_json_spelling_replay(
    http_server_client: Any, redis: Redis, first: str, second: str
) -> None:
    key = {"Idempotency-Key": f"spell-{uuid.uuid4()}"}
    code1, _, one = await post_text(http_server_client, first, key)
    code2, head, two = await post_text(http_server_client, second, key)
    assert (code1, code2) == (202, 202), (one, two)
    assert two["order_id"] == one["order_id"] and head["Idempotent-Replayed"] == "true"
    assert await order_count(redis) == 1


async def test_a_different_amount_by_one_unit_is_another_order(http_server_client: Any) -> None:
    key = {"Idempotency-Key": "one-lamport-apart"}
    await post_text(http_server_client, ORDER_TEXT % ("2", "0.05"), key)
    code, _, body = await post_text(http_server_client, ORDER_TEXT % ("2.000000001", "0.05"), key)
    assert code == 422 and body["error"] == "idempotency_key_reused"


async def test_the_request_is_stored_in_one_canonical_form(
    http_server_client: Any, redis: Redis
) -> None:
    _, _, body = await post_text(http_server_client, ORDER_TEXT % ("20E-1", "0.050"))
    stored = await redis.hget(keys.order(body["order_id"]), "request")
    assert stored == ('{"amount":2,"max_slippage":0.05,"order_type":"market",'
                      '"token_in":"SOL","token_out":"USDC"}')


# -- 4. exact amounts -----------------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["SOL", "USDC", "USDT", "BONK", "JUP", "RAY"])
async def test_an_amount_finer_than_the_token_unit_is_a_field_error(
    http_server_client: Any, redis: Redis, schemas: Schemas, symbol: str
) -> None:
    decimals = schemas.documents["common"]["$defs"]["token"]["x-decimals"][symbol]
    other = "USDC" if symbol != "USDC" else "SOL"
    order = '{"token_in":"%s","token_out":"%s","amount":%s,"order_type":"market","max_slippage":0.01}'
    unit = f"1e-{decimals}"
    finer = f"1e-{decimals + 1}"
    many = "1." + "0" * (decimals - 1) + "11"  # one decimal place too many
    for amount in (finer, many, "5e-324", "1e-12" if decimals < 12 else "1e-13"):
        code, _, body = await post_text(http_server_client, order % (symbol, other, amount))
        assert code == 400 and body["error"] == "invalid_order", (symbol, amount, body)
        [detail] = body["details"]
        assert detail["field"] == "amount"
        assert f"{symbol} has {decimals} decimals" in detail["message"], detail
    assert await order_count(redis) == 0
    # Exactly one unit, and a whole number of units written with trailing zeros: fine.
    for amount in (unit, "2." + "0" * (decimals + 4)):
        code, _, body = await post_text(http_server_client, order % (symbol, other, amount))
        assert code == 202, (symbol, amount, body)


@pytest.mark.parametrize(
    ("slippage", "code"),
    [("0.0099999999999999999999", 400), ("0.01", 202), ("0.01000000000000000001", 202),
     ("0.5", 202), ("0.5000000000000000000001", 400), ("5e-1", 202)],
)
async def test_slippage_bounds_are_exact(http_server_client: Any, slippage: str, code: int) -> None:
    status, _, body = await post_text(http_server_client, ORDER_TEXT % ("1", slippage))
    assert status == code, body


async def test_a_huge_exponent_is_a_json_400(http_server_client: Any) -> None:
    for amount in ("1e99999999999999999999", "1e999999", "1e-999999"):
        code, _, body = await post_text(http_server_client, ORDER_TEXT % (amount, "0.05"))
        assert code == 400 and body["error"] in ("invalid_json", "invalid_order"), body


def _decimal_places(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


async def test_amounts_come_back_exact_in_the_token_decimals(
    http_server_client: Any, services: Services, redis: Redis, config: Config
) -> None:
    _, _, accepted = await post_text(http_server_client, ORDER_TEXT % ("1.5", "0.01"))
    order_id = accepted["order_id"]
    await build_worker(redis, config).run(burst=True)
    response = await http_server_client.fetch(f"/api/orders/{order_id}")
    text = response.body.decode()
    # The raw JSON text: amounts written exactly, never a binary float's digits.
    assert '"request":{"amount":1.5,' in text
    view = json.loads(text, parse_float=Decimal)
    assert view["status"] == "confirmed", view
    building, confirmed = view["history"][2], view["history"][4]
    for name in ("expected_amount_out", "min_amount_out"):
        written = re.search(rf'"{name}":([0-9.]+)', text)
        assert written is not None and _decimal_places(written.group(1)) == 6  # USDC's
    written = re.search(r'"amount_out":([0-9.]+)', text)
    assert written is not None and _decimal_places(written.group(1)) == 6
    received = amounts.token("USDC").to_base_units(confirmed["amount_out"])
    assert confirmed["execution_price"] == amounts.price(
        1_500_000_000, amounts.token("SOL"), received, amounts.token("USDC")
    )
    assert view["amount_out"] == confirmed["amount_out"]
    least = amounts.token("USDC").to_base_units(building["min_amount_out"])
    expected = amounts.token("USDC").to_base_units(building["expected_amount_out"])
    assert least == expected * 99 // 100  # 1% less, rounded down to a micro-USDC


async def test_an_order_too_small_to_buy_one_unit_fails_with_a_clear_reason(
    store: OrderStore, redis: Redis, config: Config
) -> None:
    # One lamport (1e-9 SOL) buys ~2.2e-7 USDC: less than USDC's smallest unit.
    order_id = str(uuid.uuid4())
    await store.create(order_id, {**VALID_ORDER, "amount": Decimal("0.000000001")})
    await build_worker(redis, config).run(burst=True)
    order = await store.get(order_id)
    assert order is not None and order.status == "failed"
    assert order.reason and "less than the smallest unit of USDC (0.000001)" in order.reason, order.reason
    assert order.tx_hash is None  # nothing was sent


# -- 5. HEAD -------------------------------------------------------------------------------


async def test_every_get_resource_answers_head_without_a_body(http_server_client: Any) -> None:
    _, accepted = await post_order(http_server_client)
    paths = ["/healthz", "/readyz", "/metrics", "/api/schemas", "/api/schemas/order.json",
             "/api/openapi.json", "/api/asyncapi.json", f"/api/orders/{accepted['order_id']}",
             f"/api/orders/{uuid.uuid4()}", "/no/such/path"]
    for path in paths:
        get = await http_server_client.fetch(path, raise_error=False)
        head = await http_server_client.fetch(path, method="HEAD", raise_error=False)
        assert head.code == get.code, (path, head.code, get.code)
        assert head.body == b"", path
        assert head.headers["Content-Type"] == get.headers["Content-Type"], path
        if path != "/metrics":  # its figures move between two scrapes
            assert head.headers["Content-Length"] == get.headers["Content-Length"], path


async def test_head_where_get_is_not_served_is_405_naming_the_methods(http_server_client: Any) -> None:
    head = await http_server_client.fetch("/api/orders/execute", method="HEAD", raise_error=False)
    assert head.code == 405 and head.headers["Allow"] == "POST" and head.body == b""
    get = await http_server_client.fetch(f"/api/orders/{uuid.uuid4()}", method="PUT",
                                         body=b"", raise_error=False)
    assert get.headers["Allow"] == "GET, HEAD, DELETE"
    # The WebSocket's path: HEAD answers as a GET without Upgrade does.
    status = await http_server_client.fetch("/api/orders/status", method="HEAD", raise_error=False)
    assert status.code == 400 and status.body == b""


# -- 8. lone surrogates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"x\\ud800": 1}',  # the input: in a key
        '{"token_in": "\\udc00", "token_out": "USDC", "amount": 1, "order_type": "market", "max_slippage": 0.1}',
        '{"a": ["ok", ["\\udfff"]]}',  # deep in an array
        '["\\ud800"]',
        '"\\ud83d"',  # a high surrogate with no low one
        '{"x": "\\udc00\\ud800"}',  # a pair the wrong way round
        '{"x": "\\ud83d\\u0041"}',  # a high surrogate before a non-surrogate
    ],
)
async def test_a_lone_surrogate_anywhere_is_invalid_json(
    http_server_client: Any, redis: Redis, text: str
) -> None:
    code, _, body = await post_text(http_server_client, text)  # orjson would refuse a bad answer
    assert code == 400 and body["error"] == "invalid_json", body
    assert "surrogate" in body["message"]
    assert await order_count(redis) == 0


async def test_a_valid_surrogate_pair_is_text_and_is_answered_as_utf8(http_server_client: Any) -> None:
    text = '{"x\\ud83d\\ude00": 1}'
    response = await http_server_client.fetch("/api/orders/execute", method="POST", body=text.encode(),
                                              headers={"Content-Type": "application/json"},
                                              raise_error=False)
    body = orjson.loads(response.body)
    assert response.code == 400 and body["error"] == "invalid_order"
    assert {"field": "x\U0001f600", "message": "is not a known field"} in body["details"]
    assert "\U0001f600".encode() in response.body  # UTF-8, not an escape of a pair


# -- 9. Sec-WebSocket-Key -------------------------------------------------------------------


def _handshake(port: int, key_lines: list[str]) -> bytes:
    keys_text = "".join(f"Sec-WebSocket-Key: {key}\r\n" for key in key_lines)
    return (
        f"GET /api/orders/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{keys_text}\r\n"
    ).encode()


@pytest.mark.parametrize(
    "key_lines",
    [["x"], [""], ["A" * 24], ["AAAAAAAAAAAAAAAAAAAAA==="], [base64.b64encode(os.urandom(17)).decode()],
     [base64.b64encode(os.urandom(15)).decode()], ["!" * 22 + "=="],
     [base64.b64encode(os.urandom(16)).decode()] * 2],
    ids=["x", "empty", "no_padding", "bad_padding", "17_bytes", "15_bytes", "not_base64", "twice"],
)
async def test_a_malformed_websocket_key_is_a_json_400(http_server_client: Any, key_lines: list[str]) -> None:
    port = port_of(http_server_client)
    status, head, body = await raw_http("127.0.0.1", port, _handshake(port, key_lines))
    assert status == 400, (status, head)
    assert head["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "bad_handshake"


async def test_a_well_formed_websocket_key_is_upgraded(http_server_client: Any) -> None:
    port = port_of(http_server_client)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_handshake(port, [base64.b64encode(os.urandom(16)).decode()]))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 101 ")


# -- 11. cross-site requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},  # the input: no Content-Type at all
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},  # a form's
        {"Origin": "https://evil.example", "Content-Type": "application/json"},
        {"Origin": "null"},  # a sandboxed frame, a file: page
        {"Origin": "http://127.0.0.1.evil.example"},
    ],
)
async def test_a_post_from_a_foreign_origin_is_a_json_403_and_creates_nothing(
    http_server_client: Any, redis: Redis, headers: dict[str, str]
) -> None:
    port = port_of(http_server_client)
    body = json.dumps(VALID_ORDER).encode()
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    status, head, answer = await raw_http("127.0.0.1", port, request)
    assert status == 403, answer
    assert head["content-type"] == "application/json"
    assert json.loads(answer)["error"] == "origin_not_allowed"
    assert await order_count(redis) == 0


async def test_a_delete_from_a_foreign_origin_is_403_and_cancels_nothing(
    http_server_client: Any, redis: Redis
) -> None:
    _, accepted = await post_order(http_server_client)
    order_id = accepted["order_id"]
    response = await http_server_client.fetch(f"/api/orders/{order_id}", method="DELETE",
                                              headers={"Origin": "https://evil.example"},
                                              raise_error=False)
    assert response.code == 403
    assert await redis.hget(keys.order(order_id), "status") == "pending"


async def test_same_origin_listed_origins_and_no_origin_may_post(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "config", services.config.__class__(
        **{**services.config.__dict__, "allowed_origins": ("https://app.example",)}))
    port = port_of(http_server_client)
    for origin in (None, f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port}", "https://app.example"):
        headers = {} if origin is None else {"Origin": origin}
        response, _ = await post_order(http_server_client, headers=headers)
        assert response.code == 202, origin
    # Reading is not refused (no CORS header lets a foreign page's script see it).
    read = await http_server_client.fetch("/healthz", headers={"Origin": "https://evil.example"})
    assert read.code == 200


# -- 6. chunk extensions, and JSON for every malformed request ----------------------------


def _chunked_post(port: int, size_lines: list[bytes], trailer: bytes = b"") -> bytes:
    """A chunked POST of a valid order, one chunk per size line (its extensions
    kept), then the last chunk, a trailer section and the final CRLF."""
    body = json.dumps(VALID_ORDER).encode()
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]] if len(size_lines) == 2 else [body]
    chunks = b"".join(
        b"%x" % len(piece) + line + b"\r\n" + piece + b"\r\n"
        for piece, line in zip(pieces, size_lines, strict=True)
    )
    return (
        f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks + b"0" + trailer + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("size_lines", "trailer"),
    [
        ([b";ext=1"], b""),  # the input: 5b;ext=1
        ([b";ext"], b""),
        ([b';a=b;c="quoted; \\"value\\""'], b""),
        ([b" ; ext = 1"], b""),  # BWS wherever RFC 9112 allows it
        ([b";x=1", b";y"], b";last=chunk"),  # on every chunk, the last one too
        ([b""], b"\r\nX-Checksum: abc"),  # a trailer section (RFC 9112 7.1.2)
    ],
    ids=["ext_value", "ext_name", "quoted", "whitespace", "every_chunk", "trailer"],
)
async def test_chunk_extensions_and_trailers_are_ignored(
    http_server_client: Any, redis: Redis, size_lines: list[bytes], trailer: bytes
) -> None:
    port = port_of(http_server_client)
    status, _, body = await raw_http("127.0.0.1", port, _chunked_post(port, size_lines, trailer))
    assert status == 202, body
    assert await order_count(redis) == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5b;\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5b ext\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n;ext=1\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n+5b\r\n",
        b'POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5b;a="open\r\n',
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nnot a field\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\nHost: h\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nNo colon here\r\n\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
    ],
    ids=["empty_ext", "no_semicolon", "no_size", "plus_sign", "open_quote", "bad_trailer",
         "request_line", "version", "header_line", "gzip_encoding", "te_and_cl", "two_lengths",
         "no_host"],
)
async def test_a_malformed_request_gets_a_json_400(http_server_client: Any, request_bytes: bytes) -> None:
    status, head, body = await raw_http("127.0.0.1", port_of(http_server_client), request_bytes)
    assert status == 400, (status, body)
    assert head["content-type"] == "application/json"
    error = orjson.loads(body)
    assert error["error"] == "bad_request" and error["message"], error


async def test_chunk_extensions_are_bounded(http_server_client: Any) -> None:
    port = port_of(http_server_client)
    # Twenty one-byte chunks each carrying 1 KiB of extensions: past the 16 KiB bound.
    chunks = b"".join(b"1;x=" + b"a" * 1024 + b"\r\n{\r\n" for _ in range(20))
    request = (
        f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks + b"0\r\n\r\n"
    status, _, body = await raw_http("127.0.0.1", port, request)
    assert status == 400 and b"chunk extensions too large" in body, body


async def test_a_body_over_the_server_limit_gets_a_json_413(http_server_client: Any) -> None:
    port = port_of(http_server_client)
    # A GET with a body declared past the server's 1 MiB cap: refused before reading.
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {2 << 20}\r\n\r\n"
    status, head, body = await raw_http("127.0.0.1", port, request.encode())
    assert status == 413 and head["content-type"] == "application/json"
    assert orjson.loads(body)["error"] == "body_too_large"


# -- found by a hostile review of the above --------------------------------------------------


@pytest.mark.parametrize("origin", ["http://[x", "http://[::1", "http://x]", "https://[::1:80"])
async def test_an_origin_that_is_not_a_url_is_refused_not_a_500(
    http_server_client: Any, redis: Redis, origin: str
) -> None:
    response = await http_server_client.fetch(
        "/api/orders/execute", method="POST", body=json.dumps(VALID_ORDER).encode(),
        headers={"Origin": origin, "Content-Type": "application/json"}, raise_error=False,
    )
    assert response.code == 403 and json.loads(response.body)["error"] == "origin_not_allowed"
    port = port_of(http_server_client)
    handshake = _handshake(port, [base64.b64encode(os.urandom(16)).decode()])
    status, _, body = await raw_http("127.0.0.1", port, handshake.replace(b"\r\n\r\n", f"\r\nOrigin: {origin}\r\n\r\n".encode()))
    assert status == 403 and json.loads(body)["error"] == "origin_not_allowed"
    assert await order_count(redis) == 0


async def test_a_same_origin_page_under_a_host_name_must_be_listed(http_server_client: Any) -> None:
    # DNS rebinding: the attacker's name, pointed at this service, is both the page's
    # Origin and the request's Host. Only an address (or localhost) is same-origin
    # by itself.
    port = port_of(http_server_client)
    body = json.dumps(VALID_ORDER).encode()
    for host, code in ((f"rebind.example:{port}", 403), (f"127.0.0.1:{port}", 202), (f"localhost:{port}", 202),
                       (f"[::1]:{port}", 202)):
        request = (f"POST /api/orders/execute HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        status, _, answer = await raw_http("127.0.0.1", port, request)
        assert status == code, (host, answer)
        # The status WebSocket too, even where the browser says "same-origin"
        # (Tornado's own check would let both through).
        key = base64.b64encode(os.urandom(16)).decode()
        handshake = (f"GET /api/orders/status HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n"
                     "Sec-Fetch-Site: same-origin\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode()
        if code == 403:
            status, _, answer = await raw_http("127.0.0.1", port, handshake)
            assert status == 403 and json.loads(answer)["error"] == "origin_not_allowed", answer


@pytest.mark.parametrize(
    ("tail", "status", "fragment"),
    [
        (b"0" * 20_000 + b"1\r\na\r\n0\r\n\r\n", 400, b"chunk extensions too large"),
        (b"0\r\nX-Long: " + b"a" * 17_000 + b"\r\n\r\n", 400, b"trailer section too large"),
        (b"5 \r\nhello\r\n0\r\n\r\n", 400, b"invalid chunk size line"),  # no BWS after a size
        (b"5;a=b \r\nhello\r\n0\r\n\r\n", 400, b"invalid chunk size line"),  # nor after a value
        (b"".join(b"1\r\n \r\n" for _ in range(16 * 1024 + 1)) + b"0\r\n\r\n", 400, b"more than 16384 chunks"),
    ],
    ids=["long_size_line", "long_trailer", "space_after_size", "space_after_ext", "many_chunks"],
)
async def test_chunked_framing_past_its_bounds_gets_a_json_400(
    http_server_client: Any, tail: bytes, status: int, fragment: bytes
) -> None:
    port = port_of(http_server_client)
    request = (f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + tail
    got, head, body = await raw_http("127.0.0.1", port, request)
    assert (got, head["content-type"]) == (status, "application/json") and fragment in body, body


async def test_a_header_section_over_64_kib_gets_a_json_431(http_server_client: Any) -> None:
    port = port_of(http_server_client)
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: {'a' * 70_000}\r\n\r\n"
    status, head, body = await raw_http("127.0.0.1", port, request.encode())
    assert status == 431 and orjson.loads(body)["error"] == "headers_too_large"


async def test_chunked_http_1_0_is_refused(http_server_client: Any) -> None:
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    request = (b"POST /api/orders/execute HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: keep-alive\r\n\r\n0\r\n\r\n")
    status, _, body = await raw_http("127.0.0.1", port_of(http_server_client), request)
    assert status == 400 and b"HTTP/1.0" in body


async def test_an_early_answer_says_connection_close_and_a_bodiless_one_keeps_the_connection(
    http_server_client: Any,
) -> None:
    port = port_of(http_server_client)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # No body (no Content-Length): a 403 keeps the connection, the next request is served.
        writer.write(f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Origin: https://evil.example\r\n\r\n".encode())
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answers = []
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            answers.append(head)
        assert answers[0].startswith(b"HTTP/1.1 403 ") and b"Connection: close" not in answers[0]
        assert answers[1].startswith(b"HTTP/1.1 200 ")
        # A body answered before it is read: the answer says the connection closes.
        writer.write(f"POST /api/orders/execute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Authorization: Bearer {TEST_API_KEY}\r\n"
                     "Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 415 ") and b"Connection: close" in head
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_compressed_body_is_415(http_server_client: Any, redis: Redis) -> None:
    for length in ("", "declared"):
        body = json.dumps(VALID_ORDER).encode()
        response = await http_server_client.fetch(
            "/api/orders/execute", method="POST", raise_error=False,
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) if length else await post_chunked_gzip(http_server_client, body)
        assert response.code == 415, response.body
    assert await order_count(redis) == 0


async def post_chunked_gzip(client: Any, body: bytes) -> Any:
    async def produce(write: Any) -> None:
        await write(body)

    return await client.fetch("/api/orders/execute", method="POST", body_producer=produce, raise_error=False,
                              headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


def test_a_zero_with_a_huge_exponent_is_written_short() -> None:
    from engine.core import strict_json

    assert strict_json.dumps(Decimal("0E-100000")) == b"0E-100000"
    assert strict_json.dumps(Decimal("0E-99999999999")) == b"0E-99999999999"
    assert strict_json.dumps(Decimal("0.000")) == b"0.000"


async def test_redis_refusing_writes_is_a_503_and_nothing_is_created(
    lonely_redis: RedisServer, config: Config, schemas: Schemas
) -> None:
    # maxmemory 1 byte: every write is refused with OOM (the same path as MISCONF on a
    # failed disk, or READONLY after a failover).
    config = dataclasses.replace(config, redis_url=lonely_redis.url)
    services = Services.create(config, lonely_redis.url, schemas)
    server = make_http_server(make_app(services), config)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    admin = sync_redis.Redis(port=lonely_redis.port)
    try:
        admin.config_set("maxmemory", 1)
        http = AsyncHTTPClient()
        response = await http.fetch(f"http://127.0.0.1:{port}/api/orders/execute", method="POST",
                                    body=json.dumps(VALID_ORDER), raise_error=False,
                                    headers={"Content-Type": "application/json", **AUTH_HEADERS})
        body = orjson.loads(response.body)
        assert response.code == 503 and body["error"] == "unavailable", body
        assert response.headers["Retry-After"] == "1"
        admin.config_set("maxmemory", 0)
        assert admin.keys("order:*") == []
    finally:
        admin.close()
        server.stop()
        await services.close()


async def test_an_unreachable_redis_without_the_pipelined_connection_is_503_not_504(
    config: Config, schemas: Schemas
) -> None:
    # A URL with options the pipelined connection does not take (or rediss://) makes
    # the store use redis-py; a Redis it cannot connect to is still a plain 503.
    url = f"redis://127.0.0.1:{free_port()}/0?protocol=2"
    services = Services.create(dataclasses.replace(config, redis_url=url), url, schemas)
    assert services.pipe is None
    server = make_http_server(make_app(services), config)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        response = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/api/orders/execute", method="POST", raise_error=False,
            body=json.dumps(VALID_ORDER), headers={"Content-Type": "application/json", **AUTH_HEADERS},
        )
        assert response.code == 503, response.body
    finally:
        server.stop()
        await services.close()
