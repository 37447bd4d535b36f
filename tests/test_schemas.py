"""The schema files: valid, consistent with the code, and served unchanged."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.core.config import PROJECT_ROOT
from engine.web.schemas import SCHEMA_DIR, Schemas


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


# Values near every rule of the order schema, and some far from all of them.
_near = st.one_of(
    st.sampled_from(["SOL", "USDC", "USDT", "BONK", "JUP", "RAY", "sol", "DOGE", "", "market", "limit"]),
    st.sampled_from([0, 0.01, 0.0099999, 0.5, 0.5000001, 1e9, 1e9 + 1, -1, 12.5, True, False, None]),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_fields = st.sampled_from(["token_in", "token_out", "amount", "order_type", "max_slippage", "extra"])


@settings(max_examples=600, deadline=None)
@given(
    base=st.fixed_dictionaries(
        {
            "token_in": st.sampled_from(["SOL", "USDC", "BONK"]),
            "token_out": st.sampled_from(["USDC", "USDT", "SOL"]),
            "amount": st.floats(min_value=1e-9, max_value=1e9),
            "order_type": st.just("market"),
            "max_slippage": st.floats(min_value=0.01, max_value=0.5),
        }
    ),
    changes=st.dictionaries(_fields, _near, max_size=3),
    removed=st.sets(_fields, max_size=2),
    whole=st.one_of(st.none(), _near),
)
def test_the_fast_validator_agrees_with_jsonschema(
    schemas: Schemas, base: dict[str, Any], changes: dict[str, Any], removed: set[str], whole: Any
) -> None:
    document: Any = {k: v for k, v in {**base, **changes}.items() if k not in removed}
    if whole is not None:
        document = whole
    reference = schemas.validators["order_request"].is_valid(document)
    assert schemas.is_valid("order_request", document) == reference
    # And an invalid document is always explained.
    assert (schemas.errors("order_request", document) == []) == reference


def test_the_contract_checker_rejects_an_answer_off_its_schema() -> None:
    import io

    import pytest
    from tornado.httpclient import HTTPRequest, HTTPResponse
    from tornado.httputil import HTTPHeaders

    from tests.contract import check_message, check_response

    def response(code: int, body: dict[str, Any]) -> HTTPResponse:
        headers = HTTPHeaders({"Content-Type": "application/json"})
        return HTTPResponse(HTTPRequest("http://x/"), code, headers=headers,
                            buffer=io.BytesIO(json.dumps(body).encode()))

    check_response("POST", "/api/orders/execute", response(202, {"order_id": "6f1c2a3b-1111-4222-8333-444455556666", "status": "pending"}))
    with pytest.raises(AssertionError):
        check_response("POST", "/api/orders/execute", response(202, {"order_id": "x", "status": "pending"}))
    with pytest.raises(AssertionError):
        check_response("GET", "/nowhere", response(404, {"detail": "not found"}))
    with pytest.raises(AssertionError):
        check_message('{"order_id": "x", "status": "routing"}')


def test_the_readme_decimals_table_is_the_schema_s(schemas: Schemas) -> None:
    """README's token table shows the decimals schemas/common.json defines."""
    decimals = schemas.documents["common"]["$defs"]["token"]["x-decimals"]
    readme = (PROJECT_ROOT / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| token |"))
    row = next(line for line in readme.splitlines() if line.startswith("| decimals |"))
    tokens = [cell.strip() for cell in header.strip("|").split("|")][1:]
    shown = [int(cell) for cell in row.strip("|").split("|")[1:]]
    assert dict(zip(tokens, shown, strict=True)) == decimals
    assert tokens == schemas.tokens()  # every token, in the schema's order


def test_token_decimals_are_defined_once_for_every_token(schemas: Schemas) -> None:
    from engine.core import amounts

    decimals = schemas.documents["common"]["$defs"]["token"]["x-decimals"]
    assert set(decimals) == set(schemas.tokens())
    assert {t.symbol: t.decimals for t in amounts.tokens().values()} == decimals


def test_every_error_code_is_in_the_schema_and_the_readme(schemas: Schemas) -> None:
    """handlers.base.ErrorCode, schemas/error.json's enum and README's error table list
    the same codes."""
    import re

    from handlers.base import ErrorCode

    listed = schemas.documents["error"]["properties"]["error"]["enum"]
    assert listed == [code.value for code in ErrorCode]
    readme = (PROJECT_ROOT / "README.md").read_text()
    table = readme.split("| status | `error` | when | what a client should do |", 1)[1].split("\n\n", 1)[0]
    in_readme = {code for row in table.splitlines()[2:] for code in re.findall(r"`([a-z_]+)`", row.split("|")[2])}
    assert in_readme == set(listed)
