"""POST /api/orders/execute and GET /api/orders/{order_id}."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from tornado.httputil import HTTPMessageDelegate, HTTPServerRequest
from tornado.routing import Router
from tornado.web import Application, stream_request_body

from engine.core import amounts, strict_json
from engine.core.pipelined import Unanswered
from engine.core.status import Order
from engine.core.store import (
    BUILDING,
    FAILED,
    PENDING,
    ROUTING,
    STATUSES,
    OrderStore,
    TransitionResult,
    utc_timestamp,
)
from engine.web.services import Services
from handlers.auth import AccountHandler, client_address
from handlers.base import APIError, ErrorCode, override

logger = logging.getLogger(__name__)

# A request body larger than this is refused with 413 before it is read in full:
# a valid order is well under 200 bytes.
MAX_BODY_BYTES = 16 * 1024
# Idempotency keys: 1-255 printable ASCII characters, sent bare (``K``) or as a
# Structured Field string (``"K"``, as draft-ietf-httpapi-idempotency-key-header
# writes it), which is the same key. A bare key may not hold a comma or a quote: a
# proxy may join two header lines into one with a comma (RFC 9110 section 5.3), and
# Tornado does, so ``K,K`` could be two keys.
_BARE_KEY = re.compile(r"[\x21\x23-\x2b\x2d-\x7e]{1,255}")
_QUOTED_KEY = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
# The create script refuses to run this long before the request's Redis timeout
# (on Redis's clock): by the time the client is told "unknown" (504), a create still
# queued in a stalled Redis can no longer run, so a 404 for the order is final.
CREATE_DEADLINE_MARGIN_SECS = 0.5
# Retry-After of a 503 ``overloaded`` (MAX_QUEUE_LAG): long enough for the workers to
# take a good part of the queue, short enough for a client not to give up.
OVERLOADED_RETRY_AFTER_SECS = 2
ORDER_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def parse_order_id(text: str) -> str | None:
    """The canonical (lower-case) order id in ``text``, or None if it is not one."""
    candidate = text.strip().lower()
    return candidate if ORDER_ID.match(candidate) else None


def is_json(request: HTTPServerRequest) -> bool:
    """Whether the body is plain JSON: by its Content-Type (none at all counts as
    JSON), with no Content-Encoding but ``identity`` (a gzip body is not JSON text)."""
    content_type = request.headers.get("Content-Type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    return encoding == "identity" and (media_type == "application/json" or media_type.endswith("+json"))


def declared_length(request: HTTPServerRequest) -> int | None:
    """The body's length as Content-Length declares it, or None: no such header, or
    not a plain decimal number (``"²".isdigit()`` is true, yet ``int("²")`` fails)."""
    declared = request.headers.get("Content-Length")
    if declared is None or not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
        return None
    return int(declared)


class ExecuteOrderRouter(Router):
    """Picks the handler of ``POST /api/orders/execute`` from the request's headers.

    A JSON body whose Content-Length is within the limit (every real order) goes to
    ``ExecuteOrderHandler``, which Tornado hands the body read whole. Anything else (a
    chunked body, one declared too large, another media type) goes to
    ``StreamedExecuteOrderHandler``, which answers 413 or 415 without buffering it,
    and keeps Tornado from parsing a form body of its own accord first. One class
    streaming every body cost ~40 µs of CPU and 0.04 ms of latency per POST
    (docs/benchmarks.md).
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.application: Application | None = None  # set by make_app once it exists

    @override
    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> HTTPMessageDelegate | None:
        assert self.application is not None, "make_app sets ExecuteOrderRouter.application"
        declared = declared_length(request)
        handler: type[ExecuteOrderHandler] = StreamedExecuteOrderHandler
        if declared is not None and declared <= MAX_BODY_BYTES and is_json(request):
            handler = ExecuteOrderHandler
        return self.application.get_handler_delegate(request, handler, {"services": self.services})


def idempotency_key(request: HTTPServerRequest) -> str | None:
    """The request's Idempotency-Key, unquoted, or None if it has none.

    Raises APIError 400 ``invalid_idempotency_key`` for a malformed key, and for a
    header sent more than once: a retry that sends it once must find the same key.
    """
    lines = request.headers.get_list("Idempotency-Key")
    if not lines:
        return None
    if len(lines) > 1:
        raise APIError(
            400, ErrorCode.INVALID_IDEMPOTENCY_KEY, "send the Idempotency-Key header once, with one key"
        )
    value = lines[0]
    quoted = _QUOTED_KEY.fullmatch(value)
    if quoted is not None:
        value = re.sub(r"\\(.)", r"\1", quoted.group(1))
    if (quoted is None and not _BARE_KEY.fullmatch(value)) or not 1 <= len(value) <= 255:
        raise APIError(
            400,
            ErrorCode.INVALID_IDEMPOTENCY_KEY,
            "Idempotency-Key must be 1 to 255 printable ASCII characters, with no comma "
            'or quote unless the key is a quoted string ("...")',
        )
    return value


class ExecuteOrderHandler(AccountHandler):
    """Accept a market order: validate it, store it and queue it for the worker."""

    # Both classes of this endpoint count as one in the metrics (request_logger).
    metrics_name = "ExecuteOrderHandler"

    def order_body(self) -> bytes:
        return self.request.body

    def valid_order(self) -> dict[str, Any]:
        """The body as a schema-valid order with an exact amount; raises APIError."""
        try:
            order = strict_json.loads(self.order_body())
        except strict_json.InvalidJSON as exc:
            raise APIError(400, ErrorCode.INVALID_JSON, f"the body is not valid JSON: {exc}") from None
        details = self.services.schemas.errors("order_request", order)
        if not details:
            details = amounts.amount_errors(order)
        if details:
            raise APIError(400, ErrorCode.INVALID_ORDER, "the order is not valid", details)
        return dict(order)

    async def post(self) -> None:
        try:
            order = self.valid_order()
            key = idempotency_key(self.request)
        except APIError:
            # A key that is not good is told so (401) before what is wrong with its
            # request; a good one has its call counted, as any other.
            await self.authorize()
            raise
        order_id = str(uuid.uuid4())
        unanswered = Unanswered()
        timeout = self.services.config.redis_timeout_secs
        deadline = time.time() + timeout - min(CREATE_DEADLINE_MARGIN_SECS, timeout / 3)
        async with self.redis_guard(unanswered, order_id):
            result = await self.services.store.create(
                order_id, order, key, credentials=self.credentials,
                address=client_address(self.request), deadline=deadline, unanswered=unanswered,
            )
        self.apply_authorization(result.authorization)
        if result.outcome == "overloaded":
            logger.warning("order refused: %d or more orders wait for a worker (MAX_QUEUE_LAG)",
                           self.services.config.max_queue_lag)
            raise APIError(
                503, ErrorCode.OVERLOADED,
                "too many orders are waiting for a worker; nothing was created: retry after "
                "Retry-After seconds",
                headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_SECS)},
            )
        if result.outcome == "expired":
            # Redis ran the create too late to answer in time: it created nothing.
            logger.warning("order %s: Redis ran its create past the deadline; not created", order_id)
            raise APIError(503, ErrorCode.UNAVAILABLE, "the order store answered too late; "
                           "nothing was created: retry shortly")
        if result.outcome == "conflict":
            raise APIError(
                422,
                ErrorCode.IDEMPOTENCY_KEY_REUSED,
                "this Idempotency-Key was used for a different order",
                order_id=result.order_id,
            )
        if result.outcome == "replayed":
            self.set_header("Idempotent-Replayed", "true")
        else:
            # The first transition of an order; the worker logs the others.
            logger.info("order %s: accepted -> pending", result.order_id)
            self.services.prune_now_and_then(self.owner)
        self.set_header("Location", f"/api/orders/{result.order_id}")
        self.write_json({"order_id": result.order_id, "status": PENDING}, status=202)


@stream_request_body
class StreamedExecuteOrderHandler(ExecuteOrderHandler):
    """``POST /api/orders/execute`` with any body ExecuteOrderRouter does not send to
    ExecuteOrderHandler: not JSON (415), a Content-Length that is not a number (400)
    or over the limit (413), all before the body is read; or chunked, when the chunks
    are collected up to the limit, and past it read and dropped (the server's
    max_body_size bounds them), then answered 413."""

    _chunks: list[bytes]
    _size: int

    @override
    async def prepare(self) -> None:  # type: ignore[override]
        self._chunks, self._size = [], 0
        super().prepare()
        if self.request.method != "POST":
            return
        try:
            self._refuse_early()
        except APIError:
            await self.authorize()  # a key that is not good is told so first (401)
            raise

    def _refuse_early(self) -> None:
        """415, 400 or 413 from the headers alone, before the body is read."""
        if not is_json(self.request):
            raise APIError(
                415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json, with no Content-Encoding",
            )
        declared = declared_length(self.request)
        if declared is None and "Content-Length" in self.request.headers:
            raise APIError(400, ErrorCode.BAD_REQUEST, "Content-Length must be a decimal number")
        if declared is not None and declared > MAX_BODY_BYTES:
            raise APIError(
                413, ErrorCode.BODY_TOO_LARGE, f"the body must be at most {MAX_BODY_BYTES} bytes"
            )

    @override
    def data_received(self, chunk: bytes) -> None:
        # An exception raised here would only drop the connection: post() answers.
        self._size += len(chunk)
        if self._size <= MAX_BODY_BYTES:
            self._chunks.append(chunk)

    @override
    def order_body(self) -> bytes:
        if self._size > MAX_BODY_BYTES:
            raise APIError(413, ErrorCode.BODY_TOO_LARGE, f"the body must be at most {MAX_BODY_BYTES} bytes")
        return b"".join(self._chunks)


class OrderHandler(AccountHandler):
    """One order of the caller's key: its request, current state and status history
    (GET), or its cancel (DELETE). Another key's order is a 404, answered exactly as
    for an id that does not exist."""

    async def get(self, raw_id: str) -> None:
        await self.authorize()
        order_id = self._order_id(raw_id)
        async with self.redis_guard():
            stored = await self.services.store.get(order_id)
            visible = stored is not None and self.may_see(stored.owner)
            history = await self.services.store.history(order_id) if visible else []
        if stored is None or not visible:
            raise _no_order(order_id)
        self.write_json(order_view(stored, history))

    async def delete(self, raw_id: str) -> None:
        """Cancel an order that no worker has begun to build a transaction for."""
        await self.authorize()
        order_id = self._order_id(raw_id)
        owner = self.credentials.key_id if self.credentials is not None else None
        unanswered = Unanswered()
        async with self.redis_guard(unanswered, order_id, CANCEL_UNKNOWN_MESSAGE):
            result = await cancel(self.services.store, order_id, unanswered, owner=owner)
            stored = None if result.applied else await self.services.store.get(order_id)
        if result.applied:
            logger.info("order %s: cancelled by client -> failed", order_id)
        else:
            if stored is None or not self.may_see(stored.owner):
                raise _no_order(order_id)
            if stored.reason != CANCEL_REASON:  # a repeated DELETE is answered again
                raise APIError(
                    409,
                    ErrorCode.TOO_LATE,
                    f"the order is {stored.status} and its transaction may already be "
                    "sent: only an order whose transaction is not yet sent can be cancelled",
                    order_id=order_id,
                )
        self.write_json({"order_id": order_id, "status": FAILED, "reason": CANCEL_REASON})

    @staticmethod
    def _order_id(raw_id: str) -> str:
        order_id = parse_order_id(raw_id)
        if order_id is None:
            raise APIError(404, ErrorCode.NOT_FOUND, f"{raw_id[:64]!r} is not an order id")
        return order_id


# GET /api/orders: page sizes, and what a cursor looks like (an order-list entry id).
LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100
_CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_LIST_PARAMETERS = ("status", "limit", "cursor")


class OrderListHandler(AccountHandler):
    """``GET /api/orders?status=&limit=&cursor=``: the caller's key's orders, newest
    first, a page at a time (OrderStore.list_orders)."""

    async def get(self) -> None:
        await self.authorize()
        status, limit, cursor = self._query()
        async with self.redis_guard():
            orders, next_cursor = await self.services.store.list_orders(
                self.owner, status=status, limit=limit, cursor=cursor
            )
        self.write_json({"orders": [order_view(order) for order in orders], "next_cursor": next_cursor})

    def _query(self) -> tuple[str | None, int, str | None]:
        """The query's (status, limit, cursor); raises APIError 400 naming each bad
        parameter: unknown, repeated, or a value out of its range."""
        arguments = self.request.query_arguments
        details: list[dict[str, str]] = []
        values: dict[str, str] = {}
        for name, given in arguments.items():
            if name not in _LIST_PARAMETERS:
                details.append({"field": name, "message": "unknown parameter (status, limit, cursor)"})
            elif len(given) > 1:
                details.append({"field": name, "message": "send it once"})
            else:
                values[name] = given[0].decode("utf-8", "replace")
        status = values.get("status")
        if status is not None and status not in STATUSES:
            details.append({"field": "status", "message": f"one of {', '.join(STATUSES)}"})
        limit = LIST_DEFAULT_LIMIT
        raw_limit = values.get("limit")
        if raw_limit is not None:
            if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 3 \
                    and 1 <= int(raw_limit) <= LIST_MAX_LIMIT:
                limit = int(raw_limit)
            else:
                details.append({"field": "limit", "message": f"a whole number from 1 to {LIST_MAX_LIMIT}"})
        cursor = values.get("cursor")
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            details.append({"field": "cursor", "message": "the next_cursor of an earlier page"})
        if details:
            raise APIError(400, ErrorCode.BAD_REQUEST, "the query is not valid", details)
        return status, limit, cursor


def _no_order(order_id: str) -> APIError:
    """The 404 of an order that does not exist, or is not the caller's: one answer."""
    return APIError(404, ErrorCode.NOT_FOUND, f"no order {order_id}", order_id=order_id)


# Until the worker records the transaction it is about to send (on a ``building``
# order, atomically with a check that the order is still building), a cancel wins
# and nothing is sent. After that the trade may go out, and a cancel could report
# "failed" for a trade that executes: 409.
CANCELLABLE = (PENDING, ROUTING, BUILDING)
CANCEL_REASON = "cancelled by client"


CANCEL_UNKNOWN_MESSAGE = (
    "the order store did not answer in time after the cancel was sent to it, so the "
    "order may or may not be cancelled. DELETE it again (safe: a cancelled order is "
    "answered the same), or GET it."
)


async def cancel(
    store: OrderStore, order_id: str, unanswered: Unanswered | None = None, *, owner: str | None = None
) -> TransitionResult:
    """Fail the order with CANCEL_REASON if no transaction of it can be out yet (and,
    with ``owner``, only if that API key owns it: checked in the same step)."""
    return await store.transition(
        order_id, FAILED, only_from=CANCELLABLE, unless_recorded="tx_hash",
        unanswered=unanswered, owner=owner, reason=CANCEL_REASON,
    )

# The order's outcome fields that the API shows, once known.
_OUTCOME_FIELDS = ("venue", "tx_hash", "reason", "execution_price", "amount_out")


def order_view(order: Order, history: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    """The public shape of an order: schemas/order.json with its ``history`` (the
    messages passed through as stored, exact JSON text), or without it an item of
    schemas/order_list.json."""
    view: dict[str, Any] = {
        "order_id": order.id,
        "status": order.status,
        "request": strict_json.loads(order.request),
        "created_at": utc_timestamp(order.created_at),
        "updated_at": utc_timestamp(order.updated_at),
    }
    for name in _OUTCOME_FIELDS:
        value = getattr(order, name)
        if value is not None:
            view[name] = value
    if order.tx_hashes:
        view["tx_hashes"] = list(order.tx_hashes)
    if history is not None:
        view["history"] = [strict_json.raw(data) for _seq, data in history]
    return view
