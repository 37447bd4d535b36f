"""OpenAPI 3.1 (HTTP) and AsyncAPI 3.0 (WebSocket) documents, built from ``schemas/``.

No shape is written here: every request, answer and message schema comes from the
schema files, with their cross-file ``$ref``s pointed at the document's components.
The service serves the documents; ``python -m engine.web.apidocs`` writes the copies kept
in ``docs/`` (a test checks they are current).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from engine.core.config import PROJECT_ROOT
from engine.web.schemas import Schemas

DOCS_DIR = PROJECT_ROOT / "docs"
API_VERSION = "1.0.0"
TITLE = "Order execution service"
DESCRIPTION = (
    "Submit market swap orders and follow each one live, from pending to confirmed or "
    "failed. Shapes are defined by the JSON Schema files served at /api/schemas."
)


def _components(schemas: Schemas, base: str) -> dict[str, Any]:
    """Every schema file (by title) and every shared definition, refs made local.

    A file's ``$id`` goes, so its refs are rewritten to absolute pointers into the
    document: ``common.json#/$defs/x`` to the shared definition ``x``; ``f.json``
    to f's component, and ``f.json#/p`` (or, inside f, ``#/p``) to the same pointer
    under it (e.g. ``order.json#/$defs/summary`` to ``.../Order/$defs/summary``)."""
    names: dict[str, str] = {
        name: doc["title"] for name, doc in schemas.documents.items() if name != "common"
    }

    def target(file: str, pointer: str) -> str:
        if file == "common":
            return "#/" + base + pointer.rsplit("/", 1)[-1]
        return "#/" + base + names[file] + pointer

    def localise(node: Any, here: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("$schema", "$id"):
                    continue
                if key == "$ref" and isinstance(value, str):
                    file, _, pointer = value.partition("#")
                    file = file.removesuffix(".json") if file else here
                    if file == "common" or file in names:
                        value = target(file, pointer)
                out[key] = localise(value, here)
            return out
        if isinstance(node, list):
            return [localise(item, here) for item in node]
        return node

    components: dict[str, Any] = {}
    for name, definition in schemas.documents["common"]["$defs"].items():
        components[name] = localise(copy.deepcopy(definition), "common")
    for name, title in sorted(names.items()):
        components[title] = localise(copy.deepcopy(schemas.documents[name]), name)
    return components


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _json("Error")}
    if headers:
        answer["headers"] = headers
    return answer


def _header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


# The API key (engine.core.accounts): the one security scheme, on every /api/orders
# operation. The status WebSocket takes the key in its first message instead
# (asyncapi's channel description says why).
SECURITY_SCHEME = "apiKey"
_SECURITY_SCHEMES = {
    SECURITY_SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "oek_... API key",
        "description": (
            "An API key, sent on every /api/orders call as `Authorization: Bearer "
            "oek_<key id: 16 hex digits>_<secret: 43 base64url characters>`. Get one from "
            "the operator: `make api-key NAME=<who it is for> [RATE=calls/s] [BURST=calls]` "
            "prints a new key, once (the service keeps only its SHA-256 digest); `make "
            "api-keys` lists them, `make api-key-revoke KEY=<id or name>` revokes one. "
            "`make run` (embedded mode) writes a development key to data/dev-api-key. A "
            "key sees only its own orders (another key's order is a 404, the same as a "
            "missing one) and has a rate limit, reported on each answer by the RateLimit "
            "and RateLimit-Policy headers. No key, or a malformed, unknown or revoked one: "
            "401 with WWW-Authenticate; the limit reached, or too many failed attempts from "
            "one address: 429 with Retry-After."
        ),
    }
}
_SECURITY: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
# Response headers (RFC 6750, RFC 9110, draft-ietf-httpapi-ratelimit-headers-10).
_HEADERS: dict[str, Any] = {
    "WWW-Authenticate": {
        "description": (
            'The challenge (RFC 6750 section 3): `Bearer realm="orders"` when no key was sent, '
            'with `, error="invalid_request"` for a malformed key (or Authorization sent '
            'twice), `, error="invalid_token"` for an unknown or revoked one.'
        ),
        "required": True,
        "schema": {
            "type": "string",
            "pattern": '^Bearer realm="orders"(, error="(invalid_request|invalid_token)")?$',
        },
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying (RFC 9110 section 10.2.3).",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
    "RateLimit-Policy": {
        "description": (
            'The API key\'s rate limit (draft-ietf-httpapi-ratelimit-headers-10): `"per-key";'
            "q=<calls>;w=<seconds>`, a quota of q calls (the key's burst) a window of w "
            "seconds, refilled continuously at q/w calls a second. On every answer to a "
            "request whose key was checked."
        ),
        "schema": {"type": "string", "pattern": '^"per-key";q=[0-9]+;w=[0-9]+$'},
    },
    "RateLimit": {
        "description": (
            'What is left of the key\'s limit after this call: `"per-key";r=<remaining>;'
            "t=<seconds>`, r calls would pass now, and the whole quota is back in t seconds."
        ),
        "schema": {"type": "string", "pattern": '^"per-key";r=[0-9]+;t=[0-9]+$'},
    },
}
_RATE_LIMIT_HEADERS = {name: _header(name) for name in ("RateLimit", "RateLimit-Policy")}
_UNAUTHORIZED = _error(
    "No API key, or one that is malformed, unknown or revoked (WWW-Authenticate says which)",
    {"WWW-Authenticate": _header("WWW-Authenticate")},
)
_RATE_LIMITED = _error(
    "The key's rate limit is reached, or this address made too many failed attempts: "
    "nothing was done; wait Retry-After seconds",
    {"Retry-After": _header("Retry-After"), **_RATE_LIMIT_HEADERS},
)
# Answered before the key is checked: no RateLimit headers.
_BEFORE_THE_KEY = ("401", "403")


def _account_operation(operation: dict[str, Any]) -> dict[str, Any]:
    """An /api/orders operation: the API key required, its 401 and 429, and the
    RateLimit headers on every answer given once the key was checked."""
    responses = {**operation["responses"], "401": _UNAUTHORIZED, "429": _RATE_LIMITED}
    for status, answer in responses.items():
        if status not in _BEFORE_THE_KEY:
            responses[status] = {
                **answer, "headers": {**answer.get("headers", {}), **_RATE_LIMIT_HEADERS}
            }
    return {**operation, "security": _SECURITY, "responses": dict(sorted(responses.items()))}


_ANY_JSON_DOCUMENT = {
    "description": "The document",
    "content": {"application/json": {"schema": {"type": "object"}}},
}
_UNAVAILABLE = _error(
    "Redis is unreachable; nothing was done: retry after the Retry-After delay",
    {"Retry-After": _header("Retry-After")},
)
_OVERLOADED_OR_UNAVAILABLE = _error(
    "Nothing was done: retry after the Retry-After delay. `overloaded`: MAX_QUEUE_LAG "
    "orders already wait for a worker; `unavailable`: Redis is unreachable",
    {"Retry-After": _header("Retry-After")},
)
_FOREIGN_ORIGIN = _error("Sent by a browser page on an origin not allowed (Origin header)")
_NO_ORDER = _error("No such order, or another API key's (answered the same)")
_ORDER_ID_PARAM = {
    "name": "order_id",
    "in": "path",
    "required": True,
    # A UUID: so "status" (the WebSocket's path, /api/orders/status) is not an order id.
    "schema": {"$ref": "#/components/schemas/order_id"},
    "description": "The order id from POST /api/orders/execute",
}


def openapi(schemas: Schemas) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API."""
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": API_VERSION, "description": DESCRIPTION},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": {
            "/api/orders": {
                "get": _account_operation({
                    "operationId": "listOrders",
                    "summary": "The API key's orders, newest first, a page at a time",
                    "description": (
                        "Each order without its history (GET /api/orders/{order_id} has "
                        "it). Pass next_cursor as cursor for the next page; with a status, "
                        "a page may hold fewer than limit orders and still have a next one."
                    ),
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"$ref": "#/components/schemas/status"},
                            "description": "Only the orders now in this status",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                            "description": "At most this many orders",
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"},
                            "description": "The next_cursor of the previous page (none: the newest orders)",
                        },
                    ],
                    "responses": {
                        "200": {"description": "A page of orders", "content": _json("OrderList")},
                        "400": _error(
                            "A query parameter unknown, sent twice, or out of its range (see details)"
                        ),
                        "503": _UNAVAILABLE,
                    },
                })
            },
            "/api/orders/execute": {
                "post": _account_operation({
                    "operationId": "executeOrder",
                    "summary": "Submit a market order",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "pattern": '^([!#-+\\--~]{1,255}|"([ !#-\\[\\]-~]|\\\\["\\\\]){1,255}")$',
                            },
                            "description": (
                                "Same key and the same order (equal values, any JSON spelling) "
                                "within 24 h, from the same API key: the same order. Sent once; "
                                "bare, or as a quoted string (the same key)."
                            ),
                        }
                    ],
                    "requestBody": {"required": True, "content": _json("OrderRequest")},
                    "responses": {
                        "202": {
                            "description": "Accepted: follow it on the WebSocket",
                            "headers": {
                                "Location": {"schema": {"type": "string"}, "required": True}
                            },
                            "content": _json("OrderAccepted"),
                        },
                        "400": _error("Not strict JSON, or not a valid order (see details)"),
                        "403": _FOREIGN_ORIGIN,
                        "413": _error("Body over 16 KiB"),
                        "415": _error("Content-Type is not JSON"),
                        "422": _error("Idempotency-Key reused with another order"),
                        "503": _OVERLOADED_OR_UNAVAILABLE,
                        "504": _error(
                            "The order store took the order but did not answer in time: it "
                            "may or may not exist (order_id names it). Retry with the same "
                            "Idempotency-Key, or GET the order: a 404 now is final."
                        ),
                    },
                })
            },
            "/api/orders/{order_id}": {
                "parameters": [_ORDER_ID_PARAM],
                "get": _account_operation({
                    "operationId": "getOrder",
                    "summary": "An order, its state and its status history",
                    "responses": {
                        "200": {"description": "The order", "content": _json("Order")},
                        "404": _NO_ORDER,
                        "503": _UNAVAILABLE,
                    },
                }),
                "delete": _account_operation({
                    "operationId": "cancelOrder",
                    "summary": "Cancel an order whose transaction is not yet sent",
                    "responses": {
                        "200": {"description": "Cancelled", "content": _json("OrderCancelled")},
                        "403": _FOREIGN_ORIGIN,
                        "404": _NO_ORDER,
                        "409": _error("Too late: a transaction may already be sent"),
                        "503": _UNAVAILABLE,
                    },
                }),
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "The process is up",
                    "responses": {"200": {"description": "Up", "content": _json("Health")}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Redis is reachable",
                    "responses": {
                        "200": {"description": "Ready", "content": _json("Health")},
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/api/schemas": {
                "get": {
                    "operationId": "listSchemas",
                    "summary": "The published JSON Schema files",
                    "responses": {"200": {"description": "The index", "content": _json("SchemaIndex")}},
                }
            },
            "/api/schemas/{name}": {
                "get": {
                    "operationId": "getSchema",
                    "summary": "One JSON Schema file, byte for byte (draft 2020-12)",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "A name from GET /api/schemas, with or without .json",
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The schema file",
                            "content": {"application/schema+json": {"schema": {"type": "object"}}},
                        },
                        "404": _error("No schema of that name"),
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "responses": {"200": _ANY_JSON_DOCUMENT},
                }
            },
            "/api/asyncapi.json": {
                "get": {
                    "operationId": "getAsyncApi",
                    "summary": "The AsyncAPI 3.0 document of the status WebSocket",
                    "responses": {"200": _ANY_JSON_DOCUMENT},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _components(schemas, "components/schemas/"),
            "headers": _HEADERS,
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


def asyncapi(schemas: Schemas) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the status WebSocket."""
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"{TITLE}: order status stream", "version": API_VERSION,
                 "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:3000",
                "protocol": "ws",
                "description": "make run",
            }
        },
        "channels": {
            "orderStatus": {
                "address": "/api/orders/status",
                "title": "One order's statuses, or every order of an API key",
                "description": (
                    "The client's first message picks one of two forms; later messages are "
                    "ignored. (1) The order id as plain text: every status of that order so "
                    "far is sent, then each new one, once each and in seq order, and the "
                    "server closes with 1000 after confirmed or failed. No API key is needed: "
                    "an order id is a UUID version 4 (122 random bits), which only its "
                    "creator is given, so it serves as a read-only capability for that one "
                    "order's statuses (cancelling it still takes the key). (2) `Bearer "
                    "<API key>` (the key as on HTTP calls): an account feed. The server "
                    "answers FeedSubscribed, then sends every status message of every order "
                    "of that key, live from then on (no history: GET /api/orders gives what "
                    "came before), until the client closes. A browser cannot set headers "
                    "(Authorization) on a WebSocket handshake, so the key goes in this "
                    "first message; it is checked as an HTTP call's is, and counts one call "
                    "of its rate limit. "
                    "The server closes with 4400 for a malformed id, 4404 for an unknown "
                    "order, 4408 when no first message arrives within 10 s, 4401 for a "
                    "malformed, unknown or revoked key (also when the key of an open feed is "
                    "revoked), 4429 when the key's rate limit is reached or this address made "
                    "too many failed attempts (each after an Error message), 1009 for a "
                    "message over 1 KiB, 1013 when Redis is unavailable, 1011 on an internal "
                    "error (after an Error message), 1001 when the server shuts down "
                    "(reconnect: for one order the statuses not yet seen follow; a feed "
                    "resumes live only), and the RFC 6455 codes 1002 and 1007 for malformed "
                    "frames."
                ),
                "messages": {
                    "orderId": {
                        "name": "orderId",
                        "title": "An order id",
                        "contentType": "text/plain",
                        "payload": {"$ref": "#/components/schemas/order_id"},
                    },
                    "bearer": {
                        "name": "bearer",
                        "title": "Bearer and an API key",
                        "summary": "Opens an account feed: every order of this key",
                        "contentType": "text/plain",
                        "payload": {
                            "type": "string",
                            "pattern": "^[Bb][Ee][Aa][Rr][Ee][Rr] +oek_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$",
                            "examples": ["Bearer oek_0123456789abcdef_" + "A" * 43],
                        },
                    },
                    "subscribed": {
                        "name": "subscribed",
                        "payload": {"$ref": "#/components/schemas/FeedSubscribed"},
                    },
                    "status": {
                        "name": "status",
                        "payload": {"$ref": "#/components/schemas/StatusMessage"},
                    },
                    "error": {
                        "name": "error",
                        "payload": {"$ref": "#/components/schemas/Error"},
                    },
                },
            }
        },
        "operations": {
            "subscribeToOrder": {
                "action": "send",
                "channel": {"$ref": "#/channels/orderStatus"},
                "summary": "Name the order to follow (the first and only client message; no key)",
                "messages": [{"$ref": "#/channels/orderStatus/messages/orderId"}],
            },
            "subscribeToAccount": {
                "action": "send",
                "channel": {"$ref": "#/channels/orderStatus"},
                "summary": "Follow every order of an API key (the first and only client message)",
                "messages": [{"$ref": "#/channels/orderStatus/messages/bearer"}],
            },
            "receiveStatus": {
                "action": "receive",
                "channel": {"$ref": "#/channels/orderStatus"},
                "summary": (
                    "The order's statuses, or for an account feed FeedSubscribed then its "
                    "orders' statuses; or an error before the socket closes"
                ),
                "messages": [
                    {"$ref": "#/channels/orderStatus/messages/subscribed"},
                    {"$ref": "#/channels/orderStatus/messages/status"},
                    {"$ref": "#/channels/orderStatus/messages/error"},
                ],
            },
        },
        "components": {"schemas": _components(schemas, "components/schemas/")},
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def write(directory: Path = DOCS_DIR) -> list[Path]:
    """Write docs/openapi.json and docs/asyncapi.json; the paths written."""
    schemas = Schemas()
    written = []
    for name, build in (("openapi.json", openapi), ("asyncapi.json", asyncapi)):
        path = directory / name
        path.write_text(render(build(schemas)))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write():
        print(f"wrote {written_path.relative_to(PROJECT_ROOT)}", file=sys.stderr)
