"""Every answer a test receives is checked against its schema file, after being
decoded by the strict parser (engine.core.strict_json: no lone surrogate, no duplicate key,
no NaN, numbers exact), so an answer a strict client could not read fails the test."""

from __future__ import annotations

import re
from typing import Any

from tornado.httpclient import HTTPResponse

from engine.core import strict_json
from engine.web.schemas import Schemas

_SCHEMAS = Schemas()

# The header fields an error answer must carry, by status: a 401's challenge
# (RFC 6750 section 3), the wait before a retry of a 429 or a 503 (RFC 9110 10.2.3).
_CHALLENGE = re.compile(r'Bearer realm="orders"(, error="(invalid_request|invalid_token)")?')
_SECONDS = re.compile(r"[1-9][0-9]*")
_REQUIRED_HEADERS: dict[int, tuple[str, re.Pattern[str]]] = {
    401: ("WWW-Authenticate", _CHALLENGE),
    429: ("Retry-After", _SECONDS),
    503: ("Retry-After", _SECONDS),
}

# (method, path pattern, status class) -> schema of a JSON answer.
_ROUTES: list[tuple[str, re.Pattern[str], int, str]] = [
    ("POST", re.compile(r"^/api/orders/execute$"), 202, "order_accepted"),
    ("GET", re.compile(r"^/api/orders$"), 200, "order_list"),
    ("GET", re.compile(r"^/api/orders/[^/]+$"), 200, "order"),
    ("DELETE", re.compile(r"^/api/orders/[^/]+$"), 200, "order_cancelled"),
    ("GET", re.compile(r"^/(healthz|readyz)$"), 200, "health"),
    ("GET", re.compile(r"^/api/schemas$"), 200, "schema_index"),
]


def check_response(method: str, path: str, response: HTTPResponse) -> None:
    """Raise AssertionError if a JSON answer does not match its schema."""
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("application/json") or not response.body:
        return
    body = strict_json.loads(response.body)
    if response.code in _REQUIRED_HEADERS:
        header, pattern = _REQUIRED_HEADERS[response.code]
        value = response.headers.get(header)
        assert value is not None and pattern.fullmatch(value), (
            f"{method} {path} -> {response.code}: {header} is {value!r}"
        )
    if response.code >= 400:
        name = "error"
    else:
        name = next(
            (schema for m, pattern, code, schema in _ROUTES
             if m == method and pattern.match(path) and code == response.code),
            "",
        )
    if name:
        problems = _SCHEMAS.errors(name, body)
        assert problems == [], f"{method} {path} -> {response.code}: not a valid {name}: {problems}"


def check_message(text: str) -> dict[str, Any]:
    """A WebSocket message: a status message, an error, or an account feed's first
    message (FeedSubscribed), valid against its schema."""
    message: dict[str, Any] = strict_json.loads(text)
    name = "error" if "error" in message else "feed_subscribed" if "subscribed" in message else "status_message"
    problems = _SCHEMAS.errors(name, message)
    assert problems == [], f"not a valid {name}: {problems}: {text}"
    return message
