"""Bad input, generated: never a 5xx, always a clear JSON error, the RFC's close codes.

Property-based (hypothesis) against the in-process app, which is the same
``make_app()`` the web process serves:

* POST bodies from schemas/order_request.json (hypothesis-jsonschema's ``from_schema``)
  and mutations of them (a field dropped, added, retyped, pushed out of range, the
  whole body replaced), plus raw bytes (truncated JSON, invalid UTF-8, NaN, a BOM,
  duplicate keys, deep nesting): 202 exactly when the schema says valid and the
  amount is a whole number of token_in's smallest unit, else a 400 whose body
  matches schemas/error.json.
* WebSocket first messages: any text, any bytes, over the 1 KiB limit.
* Raw WebSocket frames a library would never send (invalid UTF-8 in a text frame,
  reserved opcodes and bits, oversized and fragmented frames).
* Any path, any method, any Origin: JSON 404/405, no CORS header, foreign Origins 403.

Default runs are derandomized (the same inputs every time, so CI is stable);
``SOAK=1`` runs many more, randomly seeded. Each test records how many inputs it tried.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import json
import logging
import re
import string
import uuid
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

from engine.core import strict_json
from engine.web.schemas import Schemas
from engine.web.services import Services
from tests.faults import SOAK, scaled
from tests.faults.clients import RawWebSocket, raw_http
from tests.faults.report import Figures
from tests.helpers import TEST_API_KEY, VALID_ORDER

FUZZ = settings(
    max_examples=scaled(300, 3000),
    deadline=None,  # never a timing assertion: the machine is shared
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FEW = settings(FUZZ, max_examples=scaled(100, 1000))


def on_loop(io_loop: IOLoop, check: Callable[[], Coroutine[Any, Any, None]]) -> None:
    io_loop.run_sync(check, timeout=30)


# -- the order request schema, self-contained for hypothesis-jsonschema -----------------------


def inline_schema(schemas: Schemas, name: str) -> dict[str, Any]:
    """``name``'s schema with every $ref to a sibling file replaced by its target."""
    by_id = {doc["$id"].rsplit("/", 1)[-1]: doc for doc in schemas.documents.values()}

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            file, _, pointer = node["$ref"].partition("#")
            target: Any = by_id[file]
            for part in pointer.strip("/").split("/"):
                target = target[part]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**resolve(copy.deepcopy(target)), **resolve(rest)}
        skip = ("$schema", "$id", "$comment", "description", "title")
        return {k: resolve(v) for k, v in node.items() if k not in skip}

    return resolve(schemas.documents[name])  # type: ignore[no-any-return]


SCHEMAS = Schemas()
ORDER_SCHEMA = inline_schema(SCHEMAS, "order_request")
FIELDS = list(ORDER_SCHEMA["properties"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
edge_numbers = st.sampled_from([
    0, -0.0, 1e-320, 5e-324, -1, 0.0099999, 0.01, 0.5, 0.5000001, 1e9, 1e9 + 1, 1e308,
    2**53 + 1, 10**30, -(10**30), 10**400, True, False, Decimal("1e-12"), Decimal("1e-9"),
    Decimal("0.0000001"), Decimal("0.00001"), Decimal("0.009999999999999999999999"),
    Decimal("0.5000000000000000000001"), Decimal("2.0000000000"), Decimal("1e999999"),
])
# Each token's decimals, read here from the schema file (not from engine.core.amounts).
DECIMALS: dict[str, int] = SCHEMAS.documents["common"]["$defs"]["token"]["x-decimals"]
schema_orders = from_schema(ORDER_SCHEMA)


@st.composite
def exact_orders(draw: st.DrawFn) -> Any:
    """A schema-valid order whose amount has at most token_in's decimals (a Decimal,
    sent exactly), and a max_slippage of a few decimal places."""
    order: dict[str, Any] = dict(draw(schema_orders))  # type: ignore[arg-type]
    unit = Decimal(1).scaleb(-DECIMALS[order["token_in"]])
    order["amount"] = draw(st.decimals(min_value=unit, max_value=Decimal(10**9),
                                       places=DECIMALS[order["token_in"]]))
    order["max_slippage"] = draw(st.decimals(min_value=Decimal("0.01"), max_value=Decimal("0.5"),
                                             places=draw(st.integers(2, 8))))
    return order


# Floats from the schema (mostly finer than a token's unit: a 400) and exact ones.
valid_orders = st.one_of(schema_orders, exact_orders())


@st.composite
def mutated_orders(draw: st.DrawFn) -> Any:
    """A valid order with one or two things wrong (or, sometimes, nothing)."""
    order: dict[str, Any] = dict(draw(valid_orders))  # type: ignore[arg-type]
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["drop", "add", "retype", "edge", "same_tokens", "case",
                                     "whole", "nest"]))
        field = draw(st.sampled_from(FIELDS))
        if kind == "drop":
            order.pop(field, None)
        elif kind == "add":
            order[draw(st.text(min_size=1, max_size=30))] = draw(json_values)
        elif kind == "retype":
            order[field] = draw(json_values)
        elif kind == "edge":
            order[field] = draw(edge_numbers)
        elif kind == "same_tokens":
            order["token_out"] = order.get("token_in", "SOL")
        elif kind == "case":
            value = order.get(field)
            if isinstance(value, str):
                order[field] = draw(st.sampled_from([value.lower(), f" {value}", f"{value}\x00"]))
        elif kind == "whole":
            return draw(json_values)
        elif kind == "nest":
            depth = draw(st.integers(1, 3000))
            order[field] = json.loads("[" * depth + "]" * depth) if depth < 900 else [[[]]]
    return order


def encode(document: Any) -> bytes:
    """JSON text; a Decimal exactly as it is (orjson, which stops at 254 levels of
    nesting: deeper documents hold no Decimal and go through the json module)."""
    try:
        return strict_json.dumps(document)
    except TypeError:
        return json.dumps(document, allow_nan=False, default=float).encode()


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes that are not (strict) JSON, or are JSON only by luck."""
    valid = encode(draw(valid_orders))
    kind = draw(st.sampled_from(["bytes", "truncated", "bad_utf8", "nan", "bom", "dup",
                                 "deep", "huge_number", "splice", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + valid[at:]
    if kind == "nan":
        return valid.replace(b'"amount": ', b'"amount": ' + draw(st.sampled_from(
            [b"NaN, \"x\": ", b"Infinity, \"x\": ", b"-Infinity, \"x\": "])), 1)
    if kind == "bom":
        return b"\xef\xbb\xbf" + valid
    if kind == "dup":
        return valid[:-1] + b', "amount": 1}'
    if kind == "deep":
        depth = draw(st.integers(500, 8000))
        return b"[" * depth + b"]" * depth
    if kind == "huge_number":
        digits = draw(st.integers(300, 5000))
        return valid.replace(b'"amount": ', b'"amount": 1' + b"0" * digits + b', "x": ', 1)
    if kind == "splice":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.binary(min_size=1, max_size=8)) + valid[at:]
    return b""


# -- POST /api/orders/execute --------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """What a fuzz test tried and what it got back."""

    tried: int = 0
    codes: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    closes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"inputs_tried": self.tried, "errors": dict(self.errors)}
        if self.codes:
            figures["answers"] = {str(k): v for k, v in sorted(self.codes.items())}
            figures["5xx"] = sum(n for code, n in self.codes.items() if code >= 500)
        if self.closes:
            # "none": the connection ended without a close frame.
            figures["close_codes"] = dict(sorted(self.closes.items()))
        return figures


def check_error(response: Any, tally: Tally) -> dict[str, Any]:
    """A 4xx must be JSON matching schemas/error.json."""
    assert response.code < 500, (response.code, response.body[:300])
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert SCHEMAS.errors("error", body) == [], body
    tally.errors[body["error"]] += 1
    return body  # type: ignore[no-any-return]


def expected_valid(body: bytes) -> bool:
    """The oracle: the reference (Python) validator, on what a strict parser reads
    (every number exact), and an amount that is a whole number of token_in's units."""
    document = json.loads(body, parse_float=Decimal)
    if not SCHEMAS.validators["order_request"].is_valid(document):
        return False
    return Decimal(document["amount"]) % Decimal(1).scaleb(-DECIMALS[document["token_in"]]) == 0


async def post(client: Any, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return await client.fetch(
        "/api/orders/execute",
        method="POST",
        body=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        raise_error=False,
    )


def test_fuzzed_order_bodies_get_202_or_a_json_400_never_a_5xx(
    http_server_client: Any, io_loop: IOLoop, figures: Figures
) -> None:
    tally = Tally()

    @FUZZ
    @given(st.one_of(valid_orders, mutated_orders()))
    def check(document: Any) -> None:
        body = encode(document)

        async def go() -> None:
            response = await post(http_server_client, body)
            tally.tried += 1
            tally.codes[response.code] += 1
            if expected_valid(body):
                assert response.code == 202, (document, response.body[:300])
                assert json.loads(response.body)["status"] == "pending"
            else:
                error = check_error(response, tally)
                assert response.code == 400 and error["error"] == "invalid_order", error
                assert error.get("details"), error

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_post_json", tally.figures())
    assert tally.codes[202] > 0 and tally.codes[400] > 0


def test_fuzzed_raw_bodies_get_a_json_400_never_a_5xx(
    http_server_client: Any, io_loop: IOLoop, figures: Figures
) -> None:
    tally = Tally()

    @FUZZ
    @given(raw_bodies())
    def check(body: bytes) -> None:
        async def go() -> None:
            response = await post(http_server_client, body)
            tally.tried += 1
            tally.codes[response.code] += 1
            if response.code == 202:
                # Only bytes that happen to be a valid order in strict JSON.
                assert expected_valid(body) and "NaN" not in body.decode()
                return
            error = check_error(response, tally)
            assert response.code == 400, error
            assert error["error"] in ("invalid_json", "invalid_order"), error

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_post_raw", tally.figures())
    assert tally.codes[400] > 0


header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300
)


def test_fuzzed_headers_never_get_a_5xx(
    http_server_client: Any, io_loop: IOLoop, figures: Figures
) -> None:
    tally = Tally()
    body = encode({"token_in": "SOL", "token_out": "USDC", "amount": 1, "order_type": "market",
                   "max_slippage": 0.05})

    @FEW
    @given(
        st.one_of(header_text, st.sampled_from([
            "application/json", "application/json; charset=utf-8", "text/plain",
            "application/x-www-form-urlencoded", "application/vnd.api+json", "", ";", "*/*",
        ])),
        st.one_of(st.none(), header_text),
    )
    def check(content_type: str, idempotency_key: str | None) -> None:
        headers = {"Content-Type": content_type}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key

        async def go() -> None:
            response = await http_server_client.fetch(
                "/api/orders/execute", method="POST", body=body, headers=headers,
                raise_error=False,
            )
            tally.tried += 1
            tally.codes[response.code] += 1
            if response.code != 202:
                error = check_error(response, tally)
                assert error["error"] in (
                    "unsupported_media_type", "invalid_idempotency_key", "idempotency_key_reused"
                ), error

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_headers", tally.figures())


def _mutated_key(draw: st.DrawFn) -> str:
    """TEST_API_KEY with one edit: a character changed, dropped or added, or cut."""
    key = list(TEST_API_KEY)
    at = draw(st.integers(0, len(key) - 1))
    edit = draw(st.sampled_from(["change", "drop", "add", "cut", "case"]))
    char = draw(st.characters(min_codepoint=0x21, max_codepoint=0x7E))
    if edit == "change":
        key[at] = char
    elif edit == "drop":
        del key[at]
    elif edit == "add":
        key.insert(at, char)
    elif edit == "cut":
        key = key[:at]
    else:
        key[at] = key[at].swapcase()
    return "".join(key)


authorization_values = st.one_of(
    header_text,
    st.builds(lambda scheme, spaces, key, tail: f"{scheme}{spaces}{key}{tail}",
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", "Bearer:", ""]),
              st.sampled_from([" ", "  ", "", "\t"]),
              st.one_of(st.just(TEST_API_KEY), st.composite(_mutated_key)()),
              st.sampled_from(["", " ", "=", ",x", " extra"])),
)
BEARER_TEST_KEY = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +" + re.escape(TEST_API_KEY))


def test_fuzzed_authorization_headers_get_202_or_a_json_401(
    http_server_client: Any, io_loop: IOLoop, figures: Figures
) -> None:
    """Any Authorization value: 202 exactly for "Bearer" (any case), spaces and the
    live key; every other a 401 with its RFC 6750 challenge, never a 5xx."""
    tally = Tally()
    body = encode(VALID_ORDER)

    @FEW
    @given(authorization_values)
    def check(value: str) -> None:
        async def go() -> None:
            response = await http_server_client.fetch(
                "/api/orders/execute", method="POST", body=body, raise_error=False,
                headers={"Content-Type": "application/json", "Authorization": value},
            )
            tally.tried += 1
            tally.codes[response.code] += 1
            if BEARER_TEST_KEY.fullmatch(value.strip(" \t")):
                assert response.code == 202, (value, response.body)
            else:
                assert response.code == 401, (value, response.body)
                assert check_error(response, tally)["error"] == "unauthorized"
                assert response.headers["WWW-Authenticate"].startswith('Bearer realm="orders"')

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_authorization", tally.figures())
    assert tally.codes[202] > 0 and tally.codes[401] > 0


# -- WebSocket first messages ---------------------------------------------------------------


def ws_url(client: Any) -> str:
    return str(client.get_url("/api/orders/status").replace("http://", "ws://"))


first_messages = st.one_of(
    st.text(max_size=1100),
    st.text(min_size=1000, max_size=3000),
    st.uuids().map(str).flatmap(lambda u: st.sampled_from([u, u.upper(), f"  {u}\n", u[:-1], u + "0"])),
    st.binary(max_size=1100),
    st.binary(min_size=1020, max_size=3000),
)


def expected_close(message: str | bytes) -> int:
    size = len(message.encode() if isinstance(message, str) else message)
    if size > 1024:
        return 1009
    if isinstance(message, str):
        from handlers.orders import parse_order_id

        if parse_order_id(message) is not None:
            return 4404  # a well-formed id of no order
    return 4400


def test_fuzzed_websocket_first_messages_get_an_error_and_the_right_close_code(
    http_server_client: Any, io_loop: IOLoop, services: Services, figures: Figures
) -> None:
    tally = Tally()

    @FUZZ
    @given(first_messages)
    def check(message: str | bytes) -> None:
        async def go() -> None:
            ws = await websocket_connect(ws_url(http_server_client))
            try:
                await ws.write_message(message, binary=isinstance(message, bytes))
                received = []
                while (raw := await asyncio.wait_for(ws.read_message(), 10)) is not None:
                    received.append(raw)
            finally:
                ws.close()
            tally.tried += 1
            tally.closes[str(ws.close_code)] += 1
            expected = expected_close(message)
            assert ws.close_code == expected, (message[:80], ws.close_code, received)
            if expected == 1009:
                assert received == []
            else:
                assert len(received) == 1
                error = json.loads(received[0])
                assert SCHEMAS.errors("error", error) == [], error
                tally.errors[error["error"]] += 1

        on_loop(io_loop, go)

    check()
    on_loop(io_loop, lambda: _no_subscribers(services))
    figures.record("fuzz_ws_first_message", tally.figures())


async def _no_subscribers(services: Services) -> None:
    from tests.helpers import eventually

    await eventually(lambda: services.hub.subscriber_count == 0, message="no subscriber left")


# -- raw WebSocket frames ---------------------------------------------------------------------

# (frame bytes, the close code RFC 6455 calls for)
MALFORMED_FRAMES: dict[str, tuple[bytes, int]] = {
    "invalid_utf8_text": (RawWebSocket.frame(0x1, b"\xff\xfe order"), 1007),
    "utf16_surrogate_text": (RawWebSocket.frame(0x1, b"\xed\xa0\x80"), 1007),
    "reserved_opcode_3": (RawWebSocket.frame(0x3, b"x"), 1002),
    "reserved_opcode_7": (RawWebSocket.frame(0x7, b"x"), 1002),
    "reserved_control_opcode_b": (RawWebSocket.frame(0xB, b"x"), 1002),
    "reserved_bits": (RawWebSocket.frame(0x1, b"x", rsv=4), 1002),
    "fragmented_control_frame": (RawWebSocket.frame(0x9, b"x", fin=False), 1002),
    "control_frame_over_125": (RawWebSocket.frame(0x9, b"x" * 126), 1002),
    "continuation_without_start": (RawWebSocket.frame(0x0, b"x"), 1002),
    "unmasked_client_frame": (RawWebSocket.frame(0x1, b"x", masked=False), 1002),
    "close_code_5000": (RawWebSocket.frame(0x8, (5000).to_bytes(2, "big")), 1002),
    "close_code_1005": (RawWebSocket.frame(0x8, (1005).to_bytes(2, "big")), 1002),
    "close_code_999": (RawWebSocket.frame(0x8, (999).to_bytes(2, "big")), 1002),
    "close_one_byte_payload": (RawWebSocket.frame(0x8, b"\x03"), 1002),
    "close_reason_invalid_utf8": (RawWebSocket.frame(0x8, b"\x03\xe8\xff"), 1002),
    "text_over_1_kib": (RawWebSocket.frame(0x1, b"x" * 2000), 1009),
    "fragments_over_1_kib": (
        RawWebSocket.frame(0x1, b"x" * 600, fin=False) + RawWebSocket.frame(0x0, b"x" * 600), 1009
    ),
}

async def send_raw(client: Any, frame: bytes) -> Any:
    raw = await RawWebSocket.connect(ws_url(client))
    try:
        await raw.send(frame)
        return await raw.read_until_closed(timeout=10)
    finally:
        await raw.aclose()


# Tornado alone fails 1002/1007 cases by dropping TCP without a close frame, and
# accepts unmasked client frames; handlers/ws_protocol.py's StrictWebSocketProtocol
# sends the codes.
@pytest.mark.parametrize("name", list(MALFORMED_FRAMES))
async def test_a_malformed_frame_gets_the_rfc_6455_close_code(
    http_server_client: Any, name: str
) -> None:
    frame, code = MALFORMED_FRAMES[name]
    result = await send_raw(http_server_client, frame)
    assert result.code == code, result


@pytest.mark.parametrize("name", list(MALFORMED_FRAMES))
async def test_a_malformed_frame_ends_the_connection_and_the_server_goes_on(
    http_server_client: Any, services: Services, name: str
) -> None:
    frame, code = MALFORMED_FRAMES[name]
    result = await send_raw(http_server_client, frame)
    # Failed at once with its close code, and no JSON error.
    assert not result.timed_out, result
    assert result.code == code and result.texts == [], result
    # The process serves the next client normally.
    ws = await websocket_connect(ws_url(http_server_client))
    await ws.write_message("not an id")
    reply = await asyncio.wait_for(ws.read_message(), 10)
    assert reply is not None and json.loads(reply)["error"] == "invalid_order_id"
    ws.close()
    assert services.hub.subscriber_count == 0


@st.composite
def raw_frames(draw: st.DrawFn) -> tuple[bytes, set[int]]:
    """1-3 random frames, and the close codes the client itself sends in them (the
    server echoes a close frame's code, RFC 6455 5.5.1)."""
    frames, codes = [], set()
    for _ in range(draw(st.integers(1, 3))):
        opcode = draw(st.sampled_from([0x0, 0x1, 0x1, 0x2, 0x8, 0x9, 0xA]) | st.integers(0, 15))
        payload = draw(st.binary(max_size=200) | st.uuids().map(lambda u: str(u).encode()))
        if opcode == 0x8 and len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            # RFC 6455 7.4: codes a peer may send; any other is a protocol error (1002).
            if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
                codes.add(code)
        frames.append(RawWebSocket.frame(
            opcode, payload,
            fin=draw(st.booleans()),
            rsv=draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 4])),
            masked=draw(st.booleans() | st.just(True)),
        ))
    return b"".join(frames), codes


def test_fuzzed_raw_frames_never_crash_the_server(
    http_server_client: Any,
    io_loop: IOLoop,
    services: Services,
    figures: Figures,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tally = Tally()
    allowed = {None, 1000, 1002, 1007, 1009, 4400, 4404}

    @FEW
    @given(raw_frames())
    def check(generated: tuple[bytes, set[int]]) -> None:
        frames, echoed = generated

        async def go() -> None:
            raw = await RawWebSocket.connect(ws_url(http_server_client))
            try:
                await raw.send(frames)
                # A frame that leaves the socket open (a ping, a first fragment) is
                # followed by a normal close from this side.
                await raw.send(RawWebSocket.frame(0x8, b"\x03\xe8"))
                result = await raw.read_until_closed(timeout=10)
            finally:
                await raw.aclose()
            tally.tried += 1
            tally.closes[str(result.code or "none")] += 1
            assert not result.timed_out and result.code in allowed | echoed, result
            for text in result.texts:
                assert SCHEMAS.errors("error", json.loads(text)) == [], text

        on_loop(io_loop, go)

    with caplog.at_level(logging.ERROR):
        check()
    # Nothing raised inside a handler (Tornado logs those at ERROR with a traceback).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    on_loop(io_loop, lambda: _no_subscribers(services))
    figures.record("fuzz_ws_raw_frames", tally.figures())


# -- paths, methods, CORS, Origin --------------------------------------------------------------

KNOWN_GET = {"/healthz", "/readyz", "/metrics", "/api/schemas", "/api/openapi.json",
             "/api/asyncapi.json"}
path_segments = st.text(alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@",
                        min_size=0, max_size=20)
paths = st.one_of(
    st.lists(path_segments, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(sorted(KNOWN_GET) + ["/api/orders/execute", "/api/orders/status",
                                         "/api/orders/" + str(uuid.uuid4()), "/api/schemas/x.json"]),
)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]),
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=10),
)
origins = st.one_of(
    st.sampled_from(["null", "https://evil.example", "http://127.0.0.1", "http://localhost",
                     "file://", "https://app.example.evil.example"]),
    st.builds(lambda scheme, host, port: f"{scheme}://{host}{port}",
              st.sampled_from(["http", "https", "ws", "chrome-extension"]),
              st.from_regex(r"[a-z0-9]{1,12}(\.[a-z]{2,5}){0,2}", fullmatch=True),
              st.sampled_from(["", ":80", ":443", ":3000"])),
)


def assert_no_cors(response: Any) -> None:
    cors = [name for name in response.headers if name.lower().startswith("access-control-")]
    assert cors == [], cors


def test_any_path_and_method_gets_json_and_no_cors_header(
    http_server_client: Any, io_loop: IOLoop, figures: Figures
) -> None:
    tally = Tally()

    @FUZZ
    @given(paths, methods, origins)
    def check(path: str, method: str, origin: str) -> None:
        assume(method != "HEAD")  # no body to check
        url_path = quote(path, safe="/%!$&'()*+,;=:@-._~")

        async def go() -> None:
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            response = await http_server_client.fetch(
                url_path, method=method, body=body, raise_error=False,
                allow_nonstandard_methods=True,
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            tally.tried += 1
            tally.codes[response.code] += 1
            assert_no_cors(response)
            if response.code >= 400:
                error = check_error(response, tally)
                if response.code == 405:
                    # Allow names what the resource takes (nothing, for an unknown path).
                    assert error["error"] == "method_not_allowed" and "Allow" in response.headers
            if path not in KNOWN_GET and not path.startswith("/api/"):
                assert response.code in (404, 405), (method, path, response.code)

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_paths_methods", tally.figures())
    assert tally.codes[404] > 0 and tally.codes[405] > 0


async def test_only_an_allow_listed_origin_gets_cors_headers(
    http_server_client: Any, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "config",
                        dataclasses.replace(services.config, allowed_origins=("https://app.example",)))

    async def fetch(method: str, path: str, origin: str, **headers: str) -> Any:
        return await http_server_client.fetch(
            path, method=method, raise_error=False, allow_nonstandard_methods=True,
            body=json.dumps(VALID_ORDER) if method == "POST" else None,
            headers={"Origin": origin, "Content-Type": "application/json", **headers},
        )

    for method, path, code in (
        ("POST", "/api/orders/execute", 202), ("GET", "/healthz", 200),
        ("GET", "/api/schemas", 200), ("GET", f"/api/orders/{uuid.uuid4()}", 404),
        ("PUT", "/api/orders/execute", 405),
    ):
        allowed = await fetch(method, path, "https://app.example")
        assert allowed.code == code, (method, path, allowed.code)
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Location" in allowed.headers["Access-Control-Expose-Headers"]
        assert allowed.headers["Vary"] == "Origin"
        foreign = await fetch(method, path, "https://evil.example")
        # A page elsewhere may read (no CORS header lets its script see the answer),
        # never change anything: its POST is refused before the body is looked at.
        assert foreign.code == (403 if method in ("POST", "PUT") else code), (method, path)
        assert_no_cors(foreign)
        assert foreign.headers["Vary"] == "Origin"  # the answer depends on Origin

    preflight = await fetch("OPTIONS", "/api/orders/execute", "https://app.example",
                            **{"Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "content-type, idempotency-key"})
    assert preflight.code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type, Idempotency-Key"
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    preflight = await fetch("OPTIONS", "/api/orders/x", "https://app.example",
                            **{"Access-Control-Request-Method": "DELETE"})
    assert preflight.code == 204
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, HEAD, DELETE"
    # A preflight from elsewhere is refused without CORS headers, and an OPTIONS that is
    # not a preflight is a 405 like any other method the resource does not take.
    refused = await fetch("OPTIONS", "/api/orders/execute", "https://evil.example",
                          **{"Access-Control-Request-Method": "POST"})
    assert refused.code == 405 and refused.headers["Allow"] == "POST"
    assert_no_cors(refused)
    refused = await fetch("OPTIONS", "/api/orders/execute", "https://app.example")
    assert refused.code == 405 and refused.headers["Allow"] == "POST"
    assert json.loads(refused.body)["error"] == "method_not_allowed"


def test_a_websocket_from_a_foreign_origin_is_refused_403(
    http_server_client: Any, io_loop: IOLoop, services: Services, figures: Figures,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(services, "config",
                        dataclasses.replace(services.config, allowed_origins=("https://app.example",)))
    own = http_server_client.get_url("").rstrip("/")
    tally = Tally()

    @FEW
    @given(origins)
    def check(origin: str) -> None:
        assume(origin.rstrip("/").lower() not in ("https://app.example", own))

        async def go() -> None:
            request = HTTPRequest(ws_url(http_server_client), headers={"Origin": origin})
            with pytest.raises(HTTPClientError) as refused:
                ws = await websocket_connect(request)
                ws.close()
            tally.tried += 1
            tally.codes[refused.value.code] += 1
            assert refused.value.code == 403

        on_loop(io_loop, go)

    check()
    figures.record("fuzz_ws_origin", tally.figures())


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Origin": "https://evil.example"}, 403),
        ({"Sec-WebSocket-Version": "99"}, 426),
        ({"Sec-WebSocket-Key": ""}, 400),
        ({"Connection": "keep-alive"}, 400),
    ],
    ids=["foreign_origin", "unsupported_version", "no_key", "no_connection_upgrade"],
)
async def test_a_refused_websocket_handshake_answers_a_json_error(
    http_server_client: Any, headers: dict[str, str], code: int
) -> None:
    port = int(http_server_client.get_url("").rsplit(":", 1)[1].strip("/"))
    handshake = {
        "Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
        **headers,
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in handshake.items() if v)
    status, head, body = await raw_http(
        "127.0.0.1", port, f"GET /api/orders/status HTTP/1.1\r\n{lines}\r\n".encode()
    )
    assert status == code, head
    assert head.get("content-type", "").startswith("application/json"), head
    assert SCHEMAS.errors("error", json.loads(body)) == []
