"""GET /api/schemas/{name}: the JSON Schema files, served as they are."""

from __future__ import annotations

from handlers.base import APIError, APIHandler


class SchemaHandler(APIHandler):
    """One schema file, byte for byte, so clients can generate code from it."""

    def get(self, name: str) -> None:
        name = name.removesuffix(".json")
        raw = self.services.schemas.raw.get(name)
        if raw is None:
            known = ", ".join(sorted(self.services.schemas.raw))
            raise APIError(404, "not_found", f"no schema {name!r}; there are: {known}")
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
