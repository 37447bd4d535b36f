"""WebSocket /api/orders/status: the client sends an order id, then receives its statuses."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlparse

from asyncio import Future

from tornado.ioloop import IOLoop
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from engine.connections import REDIS_DOWN_ERRORS
from engine.services import Services
from engine.updates import Subscription
from handlers.base import APIError, JSONErrors, override
from handlers.orders import parse_order_id

logger = logging.getLogger(__name__)

# Close codes. 4400/4404 mirror HTTP's 400/404 in the application range (4000-4999).
CLOSE_FINISHED = 1000
CLOSE_UNAVAILABLE = 1013  # "try again later" (RFC 6455 registry)
CLOSE_BAD_ID = 4400
CLOSE_UNKNOWN_ORDER = 4404
CLOSE_TIMEOUT = 4408


_HANDSHAKE_ERRORS = {400: "bad_handshake", 403: "origin_not_allowed", 426: "upgrade_required"}


class OrderStatusSocket(WebSocketHandler, JSONErrors):
    """Streams one order's statuses: history first, then live, then close on a terminal one."""

    services: Services

    @override
    def initialize(self, services: Services) -> None:
        self.services = services
        self.subscription: Subscription | None = None
        self._claimed = False
        self._first_message_timer: object | None = None
        self._opened = False

    @override
    async def get(self, *args: Any, **kwargs: Any) -> None:
        # Tornado answers a plain GET (no Upgrade) with a text/plain 400; ours is JSON.
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise APIError(
                400, "websocket_required", "connect with a WebSocket client (Upgrade: websocket)"
            )
        await super().get(*args, **kwargs)

    @override
    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        # Tornado refuses a bad handshake (403 foreign origin, 400 bad headers, 426
        # unsupported version) with a text body; answer JSON like every other error.
        status = self.get_status()
        if (
            self.ws_connection is None
            and status >= 400
            and not self._headers.get("Content-Type", "").startswith("application/json")
        ):
            message = chunk if isinstance(chunk, str) and chunk else self._reason
            self.set_header("Content-Type", "application/json")
            chunk = json.dumps({"error": _HANDSHAKE_ERRORS.get(status, "bad_request"), "message": message})
        return super().finish(chunk)

    @override
    def check_origin(self, origin: str) -> bool:
        # Browsers send Origin; other clients usually don't, and Tornado only calls
        # this when one is present. Same-origin is always allowed.
        allowed = self.services.config.allowed_origins
        if origin.rstrip("/").lower() in allowed:
            return True
        return urlparse(origin).netloc.lower() == self.request.host.lower()

    @override
    def open(self, *args: str, **kwargs: str) -> None:
        self._opened = True
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
        order_id = parse_order_id(message) if isinstance(message, str) else None
        if order_id is None:
            self._fail(CLOSE_BAD_ID, "invalid_order_id", "send the order id (a UUID) as plain text")
            return
        store, hub = self.services.store, self.services.hub
        try:
            if not await store.exists(order_id):
                self._fail(CLOSE_UNKNOWN_ORDER, "not_found", f"no order {order_id}", order_id)
                return
            if self.ws_connection is None:
                return  # the client left while we looked
            self.subscription = hub.subscribe(order_id, self._send)
            await self.subscription.sync()
        except REDIS_DOWN_ERRORS as exc:
            logger.warning("status socket for %s: Redis unavailable: %s", order_id, exc)
            self._fail(CLOSE_UNAVAILABLE, "unavailable", "order updates are unavailable; retry shortly")

    def _send(self, data: str, terminal: bool) -> None:
        try:
            self.write_message(data)
        except WebSocketClosedError:
            return
        if terminal:
            self.close(CLOSE_FINISHED, "order finished")

    def _fail(self, code: int, error: str, message: str, order_id: str | None = None) -> None:
        body: dict[str, Any] = {"error": error, "message": message}
        if order_id:
            body["order_id"] = order_id
        try:
            self.write_message(json.dumps(body))
        except WebSocketClosedError:
            return
        self.close(code, message[:120])

    def _on_first_message_timeout(self) -> None:
        self._first_message_timer = None
        if not self._claimed:
            self._claimed = True
            self._fail(CLOSE_TIMEOUT, "timeout", "no order id received in time")

    def _cancel_timer(self) -> None:
        if self._first_message_timer is not None:
            IOLoop.current().remove_timeout(self._first_message_timer)
            self._first_message_timer = None

    @override
    def on_close(self) -> None:
        self._cancel_timer()
        if self._opened:
            self._opened = False
            self.services.metrics.websockets.dec()
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
