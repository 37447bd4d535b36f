"""The base of every HTTP handler: JSON in, JSON out, JSON errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from tornado.log import access_log
from tornado.web import HTTPError, RequestHandler

from engine.connections import REDIS_DOWN_ERRORS
from engine.services import Services

from typing_extensions import override

__all__ = ["APIError", "APIHandler", "JSONErrors", "NotFoundHandler", "override"]

logger = logging.getLogger(__name__)

# Error codes for the statuses Tornado raises by itself (unknown path, bad method...).
_DEFAULT_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    409: "conflict",
    415: "unsupported_media_type",
    422: "unprocessable",
    503: "unavailable",
}


class APIError(HTTPError):
    """An error answered to the client as ``{"error", "message", "details"?}``."""

    def __init__(
        self,
        status_code: int,
        error: str,
        message: str,
        details: list[dict[str, str]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, "%s: %s", error, message)
        self.body: dict[str, Any] = {"error": error, "message": message, **extra}
        if details:
            self.body["details"] = details


class JSONErrors(RequestHandler):
    """Renders every error as JSON: for the API handlers and the WebSocket handler."""

    @override
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, APIError):
            body = exc.body
        else:
            # Tornado's own errors, and anything unexpected (logged by Tornado with its
            # traceback): a JSON body with no internals in it.
            code = _DEFAULT_CODES.get(
                status_code, "internal_error" if status_code >= 500 else "error"
            )
            message = self._reason
            if isinstance(exc, HTTPError) and exc.reason:
                message = exc.reason
            body = {"error": code, "message": message}
        self.set_header("Content-Type", "application/json")
        if status_code == 503:
            self.set_header("Retry-After", "1")
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.finish(json.dumps(body, separators=(",", ":")))

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements (for a 405's Allow header)."""
        return [
            method
            for method in cls.SUPPORTED_METHODS
            if method != "OPTIONS"  # answered only as a CORS preflight
            and getattr(cls, method.lower()) is not getattr(RequestHandler, method.lower())
        ]


# CORS, for browser pages on an origin listed in ALLOWED_ORIGINS (no other origin
# gets any Access-Control-* header): what a preflight may ask for, and what a page
# may read of an answer besides the body.
CORS_ALLOW_HEADERS = "Content-Type, Idempotency-Key"
CORS_EXPOSE_HEADERS = "Location, Idempotent-Replayed, Retry-After"
CORS_MAX_AGE_SECS = 600


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
        self.set_status(status)
        self.finish(json.dumps(body, separators=(",", ":")))

    @override
    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # An APIError is an answer, not an incident: the access log already records
        # it (503s are logged where Redis failed). Everything else: Tornado's default.
        if isinstance(value, APIError):
            return
        super().log_exception(typ, value, tb)

    def redis_guard(self) -> RedisGuard:
        """``async with self.redis_guard():`` turns an unreachable or stalled Redis into
        a prompt 503 (never a hang or a 500)."""
        return RedisGuard(self)


class RedisGuard:
    """The Redis calls of one request, bounded by REDIS_TIMEOUT_SECS in all; a Redis
    error or the timeout becomes a 503. A class rather than an asynccontextmanager:
    it is on every request's path, and a generator costs more to run (see
    docs/benchmarks.md)."""

    __slots__ = ("_handler", "_timeout")

    def __init__(self, handler: APIHandler) -> None:
        self._handler = handler
        self._timeout = asyncio.timeout(handler.services.config.redis_timeout_secs)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(typ, exc, tb)
        except TimeoutError as expired:  # the timeout turns its cancellation into this
            exc = expired
        if isinstance(exc, (*REDIS_DOWN_ERRORS, TimeoutError)):
            request = self._handler.request
            logger.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
            raise APIError(
                503, "unavailable", "the order store is unavailable; retry shortly"
            ) from None


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
        raise APIError(404, "not_found", f"no resource at {self.request.path}")
