"""The published contracts: the JSON Schema files, and the OpenAPI and AsyncAPI
documents built from them."""

from __future__ import annotations

from engine.web.services import Services
from handlers.base import APIError, APIHandler, ErrorCode, override


class SchemaHandler(APIHandler):
    """One schema file, byte for byte, so clients can generate code from it."""

    def get(self, name: str) -> None:
        name = name.removesuffix(".json")
        raw = self.services.schemas.raw.get(name)
        if raw is None:
            known = ", ".join(sorted(self.services.schemas.raw))
            raise APIError(404, ErrorCode.NOT_FOUND, f"no schema {name!r}; there are: {known}")
        self.set_header("Content-Type", "application/schema+json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(raw)


class SchemaIndexHandler(APIHandler):
    """The list of schema files with their ``$id``s."""

    def get(self) -> None:
        documents = self.services.schemas.documents
        self.write_json(
            {
                "schemas": [
                    {"name": name, "$id": doc["$id"], "url": f"/api/schemas/{name}.json"}
                    for name, doc in sorted(documents.items())
                ]
            }
        )


class ApiDocumentHandler(APIHandler):
    """GET /api/openapi.json or /api/asyncapi.json, rendered once at start."""

    @override
    def initialize(self, services: Services, document: bytes = b"") -> None:
        super().initialize(services)
        self.document = document

    def get(self) -> None:
        self.finish(self.document)
