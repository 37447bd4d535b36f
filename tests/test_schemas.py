"""The schema files: valid, consistent with the code, and served unchanged."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from engine.schemas import SCHEMA_DIR, Schemas


def test_every_schema_file_is_a_valid_2020_12_schema_with_a_stable_id() -> None:
    files = sorted(SCHEMA_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {"order_request", "order_accepted", "status_message", "error", "order"}
    for path in files:
        doc = json.loads(path.read_text())
        Draft202012Validator.check_schema(doc)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"].endswith(f"/schemas/{path.name}")


def test_status_messages_require_their_fields(schemas: Schemas) -> None:
    base = {
        "order_id": "6f1c2a3b-1111-4222-8333-444455556666",
        "seq": 4,
        "timestamp": "2026-11-24T14:30:00.120Z",
    }
    assert schemas.errors("status_message", {**base, "status": "submitted"})
    assert schemas.errors("status_message", {**base, "status": "submitted", "tx_hash": "0x" + "a" * 64}) == []
    assert schemas.errors("status_message", {**base, "status": "confirmed", "tx_hash": "0x" + "a" * 64})
    assert schemas.errors("status_message", {**base, "status": "failed"})
    assert schemas.errors("status_message", {**base, "status": "failed", "reason": "Price moved 1.8% (max allowed: 1.0%)"}) == []


async def test_schema_files_are_served_byte_for_byte(http_server_client: Any) -> None:
    index = json.loads((await http_server_client.fetch("/api/schemas")).body)
    names = [entry["name"] for entry in index["schemas"]]
    assert "order_request" in names
    for entry in index["schemas"]:
        response = await http_server_client.fetch(entry["url"])
        assert response.body == (SCHEMA_DIR / f"{entry['name']}.json").read_bytes()
        assert response.headers["Content-Type"] == "application/schema+json"
    missing = await http_server_client.fetch("/api/schemas/nope", raise_error=False)
    assert missing.code == 404
    assert json.loads(missing.body)["error"] == "not_found"
