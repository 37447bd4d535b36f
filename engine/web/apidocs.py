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
    """Every schema file (by title) and every shared definition, refs made local."""
    names = {name: doc["title"] for name, doc in schemas.documents.items() if name != "common"}

    def localise(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("$schema", "$id"):
                    continue
                if key == "$ref" and isinstance(value, str):
                    file, _, pointer = value.partition("#")
                    if file == "common.json":
                        value = "#/" + base + pointer.rsplit("/", 1)[-1]
                    elif file.removesuffix(".json") in names:
                        value = "#/" + base + names[file.removesuffix(".json")]
                out[key] = localise(value)
            return out
        if isinstance(node, list):
            return [localise(item) for item in node]
        return node

    components: dict[str, Any] = {}
    for name, definition in schemas.documents["common"]["$defs"].items():
        components[name] = localise(copy.deepcopy(definition))
    for name, title in sorted(names.items()):
        components[title] = localise(copy.deepcopy(schemas.documents[name]))
    return components


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


_ANY_JSON_DOCUMENT = {
    "description": "The document",
    "content": {"application/json": {"schema": {"type": "object"}}},
}
_UNAVAILABLE = _error("Redis is unreachable; nothing was done: retry after the Retry-After delay")
_FOREIGN_ORIGIN = _error("Sent by a browser page on an origin not allowed (Origin header)")
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
            "/api/orders/execute": {
                "post": {
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
                                "within 24 h: the same order. Sent once; bare, or as a quoted "
                                "string (the same key)."
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
                        "503": _UNAVAILABLE,
                        "504": _error(
                            "The order store took the order but did not answer in time: it "
                            "may or may not exist (order_id names it). Retry with the same "
                            "Idempotency-Key, or GET the order: a 404 now is final."
                        ),
                    },
                }
            },
            "/api/orders/{order_id}": {
                "parameters": [_ORDER_ID_PARAM],
                "get": {
                    "operationId": "getOrder",
                    "summary": "An order, its state and its status history",
                    "responses": {
                        "200": {"description": "The order", "content": _json("Order")},
                        "404": _error("No such order"),
                        "503": _UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "cancelOrder",
                    "summary": "Cancel an order whose transaction is not yet sent",
                    "responses": {
                        "200": {"description": "Cancelled", "content": _json("OrderCancelled")},
                        "403": _FOREIGN_ORIGIN,
                        "404": _error("No such order"),
                        "409": _error("Too late: a transaction may already be sent"),
                        "503": _UNAVAILABLE,
                    },
                },
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
        "components": {"schemas": _components(schemas, "components/schemas/")},
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
                "title": "One order's statuses",
                "description": (
                    "Send the order id as plain text. Every status so far is sent, then "
                    "each new one, once each and in seq order. The server closes with 1000 "
                    "after confirmed or failed; 4400 for a malformed id, 4404 for an unknown "
                    "order, 4408 when no id arrives within 10 s (each after an Error "
                    "message), 1009 for a message over 1 KiB, 1013 when Redis is unavailable, "
                    "1011 on an internal error (after an Error message), 1001 when the server "
                    "shuts down (reconnect: the statuses not yet seen follow), and the RFC 6455 "
                    "codes 1002 and 1007 for malformed frames."
                ),
                "messages": {
                    "orderId": {
                        "name": "orderId",
                        "contentType": "text/plain",
                        "payload": {"$ref": "#/components/schemas/order_id"},
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
                "summary": "Name the order to follow (the first and only client message)",
                "messages": [{"$ref": "#/channels/orderStatus/messages/orderId"}],
            },
            "receiveStatus": {
                "action": "receive",
                "channel": {"$ref": "#/channels/orderStatus"},
                "summary": "The order's statuses, or an error before the socket closes",
                "messages": [
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
