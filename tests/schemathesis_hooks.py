"""schemathesis hooks for tests/test_contracts.py (SCHEMATHESIS_HOOKS names this module).

JSON Schema cannot say "at most as many decimal places as token_in has decimals"
(``multipleOf`` would, but validators that read numbers as binary floats get it
wrong: 0.7 is not a multiple of 1e-9 in doubles). The schema documents the rule
(``x-decimals``) and the service enforces it; here, an order body that schemathesis
generates has its amount rounded to its token's decimals, so that a body it calls
valid is one the service must accept, and its positive-data check stays strict.

Every operation that declares the API key (``security``: engine.web.apidocs's
SECURITY_SCHEME) is sent the tests' key, tests.helpers.TEST_API_KEY, which the
``clean_redis`` fixture stores in the server's Redis. An auth provider rather than a
fixed header in tests/schemathesis.toml: the key is written once (tests.helpers), the
other operations get no Authorization header, and schemathesis still knows the
credentials for what they are (its ``ignored_auth`` check removes them and expects a
401).
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

from engine.core.config import PROJECT_ROOT
from engine.web.apidocs import SECURITY_SCHEME
from tests.helpers import TEST_API_KEY

_DECIMALS: dict[str, int] = json.loads((PROJECT_ROOT / "schemas" / "common.json").read_bytes())[
    "$defs"
]["token"]["x-decimals"]


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    """Round an order's amount down to token_in's decimals (at least one unit)."""
    if not isinstance(body, dict):
        return body
    decimals = _DECIMALS.get(body.get("token_in"))  # type: ignore[arg-type]
    amount = body.get("amount")
    if decimals is None or isinstance(amount, bool) or not isinstance(amount, float):
        return body
    if 0 < amount <= 1e9:
        unit = 10.0**-decimals
        body["amount"] = max(round(amount, decimals), unit)
    return body


@schemathesis.auth()
class TestApiKey:
    """``Authorization: Bearer <TEST_API_KEY>`` on the operations that require a key."""

    def get(self, case: Any, ctx: Any) -> str | None:
        requirements = ctx.operation.definition.raw.get("security", [])
        return TEST_API_KEY if any(SECURITY_SCHEME in r for r in requirements) else None

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
