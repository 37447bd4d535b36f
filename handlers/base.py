"""The base of every HTTP handler: JSON in, JSON out, JSON errors."""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from tornado.httputil import HTTPServerRequest
from tornado.log import access_log
from tornado.web import HTTPError, RequestHandler
from typing_extensions import override

from engine.core import strict_json
from engine.core.config import Config
from engine.core.connections import REDIS_DOWN_ERRORS, refused_for_now
from engine.core.pipelined import Unanswered
from engine.web.services import Services

__all__ = [
    "APIError", "APIHandler", "ErrorCode", "JSONErrors", "NotFoundHandler", "origin_allowed", "override",
]

logger = logging.getLogger(__name__)

class ErrorCode(enum.StrEnum):
    """Every ``error`` the service answers, over HTTP or on the status WebSocket.
    ``schemas/error.json`` lists the same values (a test checks), and so does the
    README's table of errors."""

    INVALID_ORDER = "invalid_order"
    """The body breaks the order schema, or an amount is finer than its token's unit."""
    INVALID_JSON = "invalid_json"
    """The body is not strict JSON (NaN, duplicate keys, a lone surrogate...)."""
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    """A malformed Idempotency-Key, or the header sent more than once."""
    BAD_REQUEST = "bad_request"
    """A malformed HTTP request, or a header that may come once sent twice."""
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    """A state-changing request or a WebSocket from a page on a foreign origin."""
    FORBIDDEN = "forbidden"
    """Any other 403."""
    UNAUTHORIZED = "unauthorized"
    """No API key, or one that is malformed, unknown or revoked (401)."""
    RATE_LIMITED = "rate_limited"
    """The API key's rate limit, or the address's failed attempts: wait Retry-After."""
    NOT_FOUND = "not_found"
    """No such path, order or schema."""
    METHOD_NOT_ALLOWED = "method_not_allowed"
    """The resource does not take that method (Allow names those it does)."""
    TOO_LATE = "too_late"
    """A cancel of an order whose transaction may already be sent."""
    CONFLICT = "conflict"
    """Any other 409."""
    BODY_TOO_LARGE = "body_too_large"
    """A body over the order's 16 KiB, or over the server's 1 MiB."""
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    """A body that is not plain JSON (Content-Type, Content-Encoding)."""
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    """An Idempotency-Key already used for a different order."""
    UNPROCESSABLE = "unprocessable"
    """Any other 422."""
    HEADERS_TOO_LARGE = "headers_too_large"
    """A header section over 64 KiB."""
    WEBSOCKET_REQUIRED = "websocket_required"
    """A plain GET of the WebSocket's path."""
    BAD_HANDSHAKE = "bad_handshake"
    """A WebSocket handshake that breaks RFC 6455 (key, Connection header...)."""
    UPGRADE_REQUIRED = "upgrade_required"
    """A WebSocket version other than 13."""
    INVALID_ORDER_ID = "invalid_order_id"
    """(WebSocket) The first message is not an order id."""
    TIMEOUT = "timeout"
    """(WebSocket) No order id within the first-message timeout."""
    UNAVAILABLE = "unavailable"
    """Redis cannot be used right now; nothing was done: retry shortly."""
    OVERLOADED = "overloaded"
    """Too many orders wait for a worker (MAX_QUEUE_LAG); nothing was done."""
    OUTCOME_UNKNOWN = "outcome_unknown"
    """A write reached Redis, which did not answer in time: it may have been done."""
    INTERNAL_ERROR = "internal_error"
    """A bug: the details are in the service's log, never in the answer."""
    ERROR = "error"
    """Any other 4xx that Tornado answers by itself."""


# Error codes for the statuses Tornado raises by itself (unknown path, bad method...).
_DEFAULT_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.BODY_TOO_LARGE,
    409: ErrorCode.CONFLICT,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.UNPROCESSABLE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


class APIError(HTTPError):
    """An error answered to the client as ``{"error", "message", "details"?}``, with
    ``headers`` (e.g. WWW-Authenticate, Retry-After) on the answer."""

    def __init__(
        self,
        status_code: int,
        error: ErrorCode,
        message: str,
        details: list[dict[str, str]] | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, "%s: %s", error, message)
        self.body: dict[str, Any] = {"error": error, "message": message, **extra}
        self.headers = headers or {}
        if details:
            self.body["details"] = details


class JSONErrors(RequestHandler):
    """Renders every error as JSON: for the API handlers and the WebSocket handler."""

    # Headers that an error answer keeps (Tornado clears the others before it):
    # e.g. the RateLimit fields of a request that used one call of its key's limit.
    kept_headers: dict[str, str] | None = None

    def keep_headers(self, headers: dict[str, str]) -> None:
        """Set ``headers`` on this answer, and on an error answer that replaces it."""
        if self.kept_headers is None:
            self.kept_headers = {}
        self.kept_headers.update(headers)
        for name, value in headers.items():
            self.set_header(name, value)

    @override
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, APIError):
            body = exc.body
        else:
            # Tornado's own errors, and anything unexpected (logged by Tornado with its
            # traceback): a JSON body with no internals in it.
            code = _DEFAULT_CODES.get(
                status_code, ErrorCode.INTERNAL_ERROR if status_code >= 500 else ErrorCode.ERROR
            )
            message = self._reason
            if isinstance(exc, HTTPError) and exc.reason:
                message = exc.reason
            body = {"error": code, "message": message}
        self.set_header("Content-Type", "application/json")
        if status_code == 503:
            # Only a 503 invites a retry: it means nothing was done. A 504 (outcome
            # unknown) must not, or a naive client would place the order twice.
            self.set_header("Retry-After", "1")
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        for name, value in (self.kept_headers or {}).items():
            self.set_header(name, value)
        if isinstance(exc, APIError):
            for name, value in exc.headers.items():
                self.set_header(name, value)
        self.finish(strict_json.dumps(body))

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements (for a 405's Allow header): HEAD with
        GET (RFC 9110 section 9.3.2), never OPTIONS (answered only as a CORS
        preflight)."""
        implemented = {
            method
            for method in cls.SUPPORTED_METHODS
            if method not in ("OPTIONS", "HEAD")
            and getattr(cls, method.lower()) is not getattr(RequestHandler, method.lower())
        }
        if "GET" in implemented:
            implemented.add("HEAD")
        return [method for method in cls.SUPPORTED_METHODS if method in implemented]


# CORS, for browser pages on an origin listed in ALLOWED_ORIGINS (no other origin
# gets any Access-Control-* header): what a preflight may ask for, and what a page
# may read of an answer besides the body.
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key"
CORS_EXPOSE_HEADERS = (
    "Location, Idempotent-Replayed, Retry-After, RateLimit, RateLimit-Policy, WWW-Authenticate"
)
CORS_MAX_AGE_SECS = 600

# Methods that change state: from a browser page on a foreign origin they are
# refused (403), since a "simple" cross-site POST needs no CORS preflight and the
# browser would deliver it with the visitor's network position.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Header fields that a request may carry once (RFC 9110 section 5.3: Tornado joins
# repeated lines with a comma, so a repeat would be read as one odd value). Host is
# one too (RFC 9112 section 3.2), refused by Tornado itself (handlers/http1.py
# answers that in JSON).
SINGLETON_HEADERS = ("Content-Type", "Origin")


def origin_allowed(origin: str, request: HTTPServerRequest, config: Config) -> bool:
    """Whether a browser page at ``origin`` may act on this service: one listed in
    ALLOWED_ORIGINS, or the service's own origin (the request's Host, any scheme) when
    that is an IP address or ``localhost``. A same-origin page under a host *name*
    must be listed: a DNS-rebinding page has its own name as both Origin and Host
    while the name points at this service, and would pass as same-origin."""
    if origin.rstrip("/").lower() in config.allowed_origins:
        return True
    try:
        parsed = urlparse(origin)
        netloc, hostname = parsed.netloc.lower(), parsed.hostname
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 literal
        return False
    return netloc == request.host.lower() and hostname is not None and _is_address(hostname)


def _is_address(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


class APIHandler(JSONErrors):
    """Answers JSON only; every error, expected or not, is a JSON body."""

    services: Services

    @override
    def initialize(self, services: Services) -> None:
        self.services = services
        self._set_cors_headers()

    @override
    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        # Also called again when an error clears the headers; on the first call, from
        # Tornado's __init__, initialize() has not run yet.
        if hasattr(self, "services"):
            self._set_cors_headers()

    @override
    def prepare(self) -> None:
        """Refuse a repeated singleton header (400) and a state-changing request
        from a browser page on a foreign origin (403), before anything else."""
        headers = self.request.headers
        for name in SINGLETON_HEADERS:
            if len(headers.get_list(name)) > 1:
                raise APIError(400, ErrorCode.BAD_REQUEST, f"the {name} header must be sent once")
        origin = headers.get("Origin")
        if (
            origin is not None
            and self.request.method in STATE_CHANGING_METHODS
            and not origin_allowed(origin, self.request, self.services.config)
        ):
            raise APIError(
                403,
                ErrorCode.ORIGIN_NOT_ALLOWED,
                f"requests from pages at {origin[:100]} may not change orders; "
                "an operator can allow an origin with ALLOWED_ORIGINS",
            )

    async def head(self, *args: str, **kwargs: str) -> None:
        """HEAD of a GET resource: the GET answer's status and headers, no body
        (RFC 9110 section 9.3.2; Tornado drops the body of a HEAD answer)."""
        if "GET" not in self.allowed_methods():
            raise HTTPError(405)
        result = self.get(*args, **kwargs)
        if result is not None:
            await result

    def _cors_origin(self) -> str | None:
        origin = self.request.headers.get("Origin")
        if origin and origin.rstrip("/").lower() in self.services.config.allowed_origins:
            return origin
        return None

    def _set_cors_headers(self) -> None:
        if not self.services.config.allowed_origins:
            return
        self.set_header("Vary", "Origin")
        origin = self._cors_origin()
        if origin is not None:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)

    async def options(self, *args: str, **kwargs: str) -> None:
        """A CORS preflight from an allow-listed origin; any other OPTIONS is a 405."""
        if self._cors_origin() is None or "Access-Control-Request-Method" not in self.request.headers:
            raise HTTPError(405)
        self.set_header("Access-Control-Allow-Methods", ", ".join(self.allowed_methods()))
        self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
        self.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE_SECS))
        self.clear_header("Content-Type")
        self.set_status(204)
        self.finish()

    def write_json(self, body: Any, status: int = 200) -> None:
        """Finish with ``body`` as JSON (engine.core.strict_json.dumps: exact numbers,
        valid UTF-8 whatever the data)."""
        self.set_status(status)
        self.finish(strict_json.dumps(body))

    @override
    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # An APIError is an answer, not an incident: the access log already records
        # it (503s are logged where Redis failed). Everything else: Tornado's default.
        if isinstance(value, APIError):
            return
        super().log_exception(typ, value, tb)

    def redis_guard(
        self,
        unanswered: Unanswered | None = None,
        order_id: str | None = None,
        unknown_message: str = "",
    ) -> RedisGuard:
        """``async with self.redis_guard():`` turns an unreachable or stalled Redis into
        a prompt 503 (never a hang or a 500). For a write, pass its ``unanswered``: if
        Redis may have executed it, the answer is 504 ``outcome_unknown`` (naming
        ``order_id``, saying ``unknown_message``) instead, never a "nothing was
        done" 503."""
        return RedisGuard(self, unanswered, order_id, unknown_message or OUTCOME_UNKNOWN_MESSAGE)


class RedisGuard:
    """The Redis calls of one request, bounded by REDIS_TIMEOUT_SECS in all. A Redis
    error or the timeout becomes a 503 when nothing was done, or a 504 when a write
    was sent and its reply never came (invariant 6: a retryable error means nothing
    happened). A class rather than an asynccontextmanager: it is on every request's
    path, and a generator costs more to run (see docs/benchmarks.md)."""

    __slots__ = ("_handler", "_timeout", "_unanswered", "_order_id", "_unknown_message")

    def __init__(
        self,
        handler: APIHandler,
        unanswered: Unanswered | None,
        order_id: str | None,
        unknown_message: str,
    ) -> None:
        self._handler = handler
        self._timeout = asyncio.timeout(handler.services.config.redis_timeout_secs)
        self._unanswered = unanswered
        self._order_id = order_id
        self._unknown_message = unknown_message

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(typ, exc, tb)
        except TimeoutError as expired:  # the timeout turns its cancellation into this
            exc = expired
        if exc is not None and (
            isinstance(exc, (*REDIS_DOWN_ERRORS, TimeoutError)) or refused_for_now(exc)
        ):
            request = self._handler.request
            if self._unanswered is not None and self._unanswered.count > 0:
                logger.warning("%s %s: Redis did not answer a write (order %s): %s",
                               request.method, request.path, self._order_id, str(exc) or "timed out")
                raise APIError(504, ErrorCode.OUTCOME_UNKNOWN, self._unknown_message,
                               order_id=self._order_id) from None
            logger.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
            raise APIError(
                503, ErrorCode.UNAVAILABLE, "the order store is unavailable; nothing was done: retry shortly"
            ) from None


OUTCOME_UNKNOWN_MESSAGE = (
    "the order store did not answer in time after the order was sent to it, so the "
    "order may or may not exist. Retry with the same Idempotency-Key (safe: it returns "
    "the order if it exists, else creates it once), or GET /api/orders/{order_id}: "
    "from now on a 404 there means it does not exist and never will. Without an "
    "Idempotency-Key, a blind retry may create a second order."
)


def request_logger(services: Services) -> Callable[[RequestHandler], None]:
    """The app's ``log_function``: Tornado's access log line, plus request metrics."""
    metrics = services.metrics

    def log_request(handler: RequestHandler) -> None:
        status = handler.get_status()
        seconds = handler.request.request_time()
        name = getattr(handler, "metrics_name", None) or type(handler).__name__
        metrics.observe_request(name, handler.request.method or "", status, seconds)
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if access_log.isEnabledFor(level):  # the summary costs a few us; skip it if unused
            access_log.log(
                level, "%d %s %.2fms", status, handler._request_summary(), 1000.0 * seconds
            )

    return log_request


class NotFoundHandler(APIHandler):
    """Every path the service does not serve."""

    @override
    def prepare(self) -> None:
        raise APIError(404, ErrorCode.NOT_FOUND, f"no resource at {self.request.path}")
