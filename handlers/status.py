"""WebSocket /api/orders/status: the client sends an order id, then receives its statuses."""

from __future__ import annotations

import base64
import binascii
import logging
from asyncio import Future
from typing import Any

from tornado.ioloop import IOLoop
from tornado.websocket import (
    WebSocketClosedError,
)

from engine.core import strict_json
from engine.core.accounts import ANONYMOUS
from engine.core.connections import REDIS_DOWN_ERRORS
from engine.web.services import Services
from engine.web.updates import Feed, Subscription
from handlers.auth import bearer_credentials, client_address, refusal
from handlers.base import APIError, ErrorCode, JSONErrors, origin_allowed, override
from handlers.orders import parse_order_id
from handlers.ws_protocol import StrictWebSocketHandler, restore_write_queues, shed_handshake_state

logger = logging.getLogger(__name__)

# Close codes. 4400/4404 mirror HTTP's 400/404 in the application range (4000-4999).
CLOSE_FINISHED = 1000
CLOSE_GOING_AWAY = 1001  # this web process is shutting down: reconnect (to another)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_UNAVAILABLE = 1013  # "try again later" (RFC 6455 registry)
CLOSE_BAD_ID = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_ORDER = 4404
CLOSE_TIMEOUT = 4408
CLOSE_RATE_LIMITED = 4429


_HANDSHAKE_ERRORS = {
    400: ErrorCode.BAD_HANDSHAKE,
    403: ErrorCode.ORIGIN_NOT_ALLOWED,
    426: ErrorCode.UPGRADE_REQUIRED,
}


def valid_websocket_key(key: str | None) -> bool:
    """RFC 6455 section 4.2.1, item 5: Sec-WebSocket-Key is the base64 encoding of a
    16-byte value (24 characters, the last two ``==``). A key sent twice arrives
    joined by a comma, and fails too."""
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _quiet_write_result(future: Future[None]) -> None:
    """Retrieve a write's outcome: a client that has gone away fails the write with
    WebSocketClosedError, which is normal (on_close says it once), and a future whose
    exception nobody retrieves is logged as an ERROR with a traceback."""
    if not future.cancelled():
        future.exception()


class OrderStatusSocket(StrictWebSocketHandler, JSONErrors):
    """Streams one order's statuses: history first, then live, then close on a terminal one.

    Or, when the first message is ``Bearer <API key>`` instead of an order id (a
    browser can send that, unlike an Authorization header), every status of every
    order of that key, live, on one socket (an account feed): after a
    ``{"subscribed": ...}`` message, until the client closes or the key is revoked.
    """

    services: Services

    @override
    def initialize(self, services: Services) -> None:
        self.services = services
        self.subscription: Subscription | None = None
        self.feed: Feed | None = None
        self._claimed = False
        self._first_message_timer: object | None = None
        self._opened = False

    @override
    async def get(self, *args: Any, **kwargs: Any) -> None:
        # Tornado answers a plain GET (no Upgrade) with a text/plain 400; ours is JSON.
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise APIError(
                400, ErrorCode.WEBSOCKET_REQUIRED, "connect with a WebSocket client (Upgrade: websocket)"
            )
        # Tornado takes any key; a client whose key is malformed is not following
        # RFC 6455 and would get an accept value it cannot check.
        if not valid_websocket_key(self.request.headers.get("Sec-WebSocket-Key")):
            raise APIError(
                400,
                ErrorCode.BAD_HANDSHAKE,
                "Sec-WebSocket-Key must be sent once, as the base64 of 16 bytes (RFC 6455 4.2.1)",
            )
        await super().get(*args, **kwargs)

    async def head(self, *args: Any, **kwargs: Any) -> None:
        """HEAD: as a GET without Upgrade would be answered, with no body."""
        raise APIError(
            400, ErrorCode.WEBSOCKET_REQUIRED, "connect with a WebSocket client (Upgrade: websocket)"
        )

    @override
    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        # Tornado refuses a bad handshake (403 foreign origin, 400 bad headers, 426
        # unsupported version) with a text body; answer JSON like every other error.
        status = self.get_status()
        if (
            status >= 400
            and not self._headers.get("Content-Type", "").startswith("application/json")
        ):
            message = chunk if isinstance(chunk, str) and chunk else self._reason
            self.set_header("Content-Type", "application/json")
            error = _HANDSHAKE_ERRORS.get(status, ErrorCode.BAD_REQUEST)
            chunk = strict_json.dumps({"error": error, "message": message})
        return super().finish(chunk)

    @override
    def check_origin(self, origin: str) -> bool:
        # Browsers send Origin; other clients usually don't, and Tornado only calls
        # this when one is present. Same-origin is always allowed.
        return origin_allowed(origin, self.request, self.services.config)

    @override
    def open(self, *args: str, **kwargs: str) -> None:
        shed_handshake_state(self)
        self._opened = True
        self.services.open_sockets.add(self)
        self.services.metrics.websockets.inc()
        self._first_message_timer = IOLoop.current().call_later(
            self.services.config.ws_first_message_timeout_secs, self._on_first_message_timeout
        )

    @override
    async def on_message(self, message: str | bytes) -> None:
        if self._claimed:
            return  # one order per socket; later messages are ignored
        self._claimed = True
        self._cancel_timer()
        if isinstance(message, str) and message[:7].lower() == "bearer ":
            await self._follow_account(message)
            return
        order_id = parse_order_id(message) if isinstance(message, str) else None
        if order_id is None:
            self._fail(CLOSE_BAD_ID, ErrorCode.INVALID_ORDER_ID, "send the order id (a UUID) as plain text")
            return
        store, hub = self.services.store, self.services.hub
        try:
            if not await store.exists(order_id):
                self._fail(CLOSE_UNKNOWN_ORDER, ErrorCode.NOT_FOUND, f"no order {order_id}", order_id)
                return
            if self.ws_connection is None:
                return  # the client left while we looked
            self.subscription = hub.subscribe(order_id, self._send)
            await self.subscription.sync()
        except REDIS_DOWN_ERRORS as exc:
            logger.warning("status socket for %s: Redis unavailable: %s", order_id, exc)
            self._fail(CLOSE_UNAVAILABLE, ErrorCode.UNAVAILABLE, "order updates are unavailable; retry shortly")
        except Exception:
            # A bug or unexpected data: say so (Tornado would drop the connection
            # without a word), and keep the details in the log.
            logger.exception("status socket for %s failed", order_id)
            self._fail(CLOSE_INTERNAL_ERROR, ErrorCode.INTERNAL_ERROR, "order updates failed; retry shortly")

    async def _follow_account(self, message: str) -> None:
        """Open an account feed for the key in ``message`` (``Bearer <key>``), after
        the same checks as an HTTP call (engine.core.accounts)."""
        owner = ANONYMOUS
        if self.services.config.auth:
            credentials = bearer_credentials(message)
            if credentials is None:
                self._fail(CLOSE_UNAUTHORIZED, ErrorCode.UNAUTHORIZED,
                           "send Bearer and an API key (oek_...), or an order id")
                return
            try:
                authorization = await self.services.api_keys.authorize(
                    credentials, client_address(self.request)
                )
            except REDIS_DOWN_ERRORS as exc:
                logger.warning("account feed: Redis unavailable: %s", exc)
                self._fail(CLOSE_UNAVAILABLE, ErrorCode.UNAVAILABLE, "order updates are unavailable; retry shortly")
                return
            refused = refusal(authorization)
            if refused is not None:
                code = CLOSE_UNAUTHORIZED if refused.status_code == 401 else CLOSE_RATE_LIMITED
                self._fail(code, refused.body["error"], refused.body["message"])
                return
            owner = credentials.key_id
        if self.ws_connection is None:
            return  # the client left while we looked
        restore_write_queues(self)  # a feed may queue many messages for a slow client
        self.feed = self.services.hub.follow(owner, self._send_feed, self._key_revoked)
        self._write(strict_json.dumps({"subscribed": "orders", "key_id": owner}))

    def _send_feed(self, data: str) -> None:
        self._write(data)

    def _key_revoked(self) -> None:
        self._fail(CLOSE_UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "this API key was revoked")

    def _write(self, data: str | bytes) -> bool:
        """Send one text message; False if the client has gone (nothing to do then)."""
        try:
            future = self.write_message(data if isinstance(data, str) else data.decode())
        except WebSocketClosedError:
            return False
        future.add_done_callback(_quiet_write_result)
        return True

    def _send(self, data: str, terminal: bool) -> None:
        if self._write(data) and terminal:
            self.close(CLOSE_FINISHED, "order finished")

    def _fail(self, code: int, error: ErrorCode, message: str, order_id: str | None = None) -> None:
        body: dict[str, Any] = {"error": error, "message": message}
        if order_id:
            body["order_id"] = order_id
        if self._write(strict_json.dumps(body)):
            self.close(code, message[:120])

    def _on_first_message_timeout(self) -> None:
        self._first_message_timer = None
        if not self._claimed:
            self._claimed = True
            self._fail(CLOSE_TIMEOUT, ErrorCode.TIMEOUT, "no order id received in time")

    def _cancel_timer(self) -> None:
        if self._first_message_timer is not None:
            IOLoop.current().remove_timeout(self._first_message_timer)
            self._first_message_timer = None

    @override
    def on_close(self) -> None:
        self._cancel_timer()
        if self._opened:
            self._opened = False
            self.services.open_sockets.discard(self)
            self.services.metrics.websockets.dec()
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
        if self.feed is not None:
            self.feed.close()
            self.feed = None
