"""The JSON Schema files in ``schemas/``: loaded and compiled once, shared by all.

The files are the single source of truth for every shape the API takes or sends.
Handlers validate requests with them, tests validate every message they receive,
and ``GET /api/schemas/{name}`` serves them unchanged to integrators.

Two validators are compiled from the same files. ``jsonschema_rs`` (Rust) answers
"valid or not" in about 1 us where ``jsonschema`` takes about 180 us for an order
request; ``jsonschema`` then explains an invalid document field by field. A
differential test keeps the two in agreement. Both compare numbers exactly: the
documents validated hold ``Decimal`` numbers (engine.core.strict_json), ``jsonschema_rs``
compares those with arbitrary precision, and ``jsonschema`` is given the schema
files with their numbers as ``Decimal`` too (a float bound like ``0.01`` is
0.01000000000000000020816..., which the exact ``Decimal("0.01")`` is below).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from engine.core import strict_json
from engine.core.config import PROJECT_ROOT

SCHEMA_DIR = PROJECT_ROOT / "schemas"


class Schemas:
    """Every schema file by name (file name without ``.json``), compiled."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        self.raw: dict[str, bytes] = {}
        documents: dict[str, Any] = {}
        for path in sorted(directory.glob("*.json")):
            self.raw[path.stem] = path.read_bytes()
            documents[path.stem] = json.loads(self.raw[path.stem])
        exact = {name: json.loads(raw, parse_float=Decimal) for name, raw in self.raw.items()}
        registry: Registry[Any] = Registry().with_resources(
            (doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012))
            for doc in exact.values()
        )
        self.documents = documents
        self.validators = {}
        self._fast: dict[str, Callable[[Any], bool]] = {}
        fast_registry = jsonschema_rs.Registry([(d["$id"], d) for d in documents.values()])
        for name, doc in documents.items():
            Draft202012Validator.check_schema(exact[name])
            self.validators[name] = Draft202012Validator(exact[name], registry=registry)
            self._fast[name] = jsonschema_rs.validator_for(doc, registry=fast_registry).is_valid

    def is_valid(self, name: str, instance: Any) -> bool:
        try:
            return self._fast[name](instance)
        except (ValueError, OverflowError):
            # An integer too large for the Rust side: let jsonschema decide.
            return bool(self.validators[name].is_valid(instance))

    def errors(self, name: str, instance: Any) -> list[dict[str, str]]:
        """Readable problems with ``instance``: ``[{"field", "message"}]``, [] if valid."""
        if self.is_valid(name, instance):  # the fast path for the common case
            return []
        validator = self.validators[name]
        details: list[dict[str, str]] = []
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.path)):
            details.extend(_describe(error))
        # One line per field and message, in a stable order.
        unique = {(d["field"], d["message"]): d for d in details}
        return list(unique.values())

    def tokens(self) -> list[str]:
        """The supported token symbols, as the schema lists them."""
        return list(self.documents["common"]["$defs"]["token"]["enum"])


def _field(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _describe(error: ValidationError) -> list[dict[str, str]]:
    field = _field(error.absolute_path)
    instance = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    if kind == "required":
        present = instance if isinstance(instance, dict) else {}
        return [
            {"field": _field([*error.absolute_path, name]), "message": "is required"}
            for name in error.validator_value
            if name not in present
        ]
    if kind == "additionalProperties":
        known = schema.get("properties", {})
        return [
            {"field": _field([*error.absolute_path, name]), "message": "is not a known field"}
            for name in instance
            if name not in known
        ]
    if kind == "type":
        if not field:
            return [{"field": "", "message": "the request body must be a JSON object"}]
        expected = error.validator_value
        article = "an" if str(expected)[0] in "aeiou" else "a"
        return [{"field": field, "message": f"must be {article} {expected}"}]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return [{"field": field, "message": _range_message(schema)}]
    if kind in ("enum", "const"):
        allowed = error.validator_value if kind == "enum" else [error.validator_value]
        what = _shown(instance)
        return [
            {
                "field": field,
                "message": f"{what} is not supported; use one of: "
                + ", ".join(str(a) for a in allowed),
            }
        ]
    if kind == "not" and not field:
        return [{"field": "token_out", "message": "must be different from token_in"}]
    return [{"field": field, "message": error.message}]


def _shown(value: Any) -> str:
    """A client's value, quoted in a message: short, and never a lone surrogate."""
    if isinstance(value, str):
        text = repr(value)  # escapes control characters and surrogates as \x.. or \ud800
    elif isinstance(value, Decimal):
        text = str(value)  # 1E+999999, not a million digits
    elif isinstance(value, (list, dict)):
        text = "an array" if isinstance(value, list) else "an object"  # of any depth
    else:
        text = strict_json.dumps_text(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range_message(schema: dict[str, Any]) -> str:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if "minimum" in schema and "maximum" in schema:
        return f"must be between {low} and {high}"
    parts = []
    if low is not None:
        parts.append(f"{'at least' if 'minimum' in schema else 'greater than'} {low}")
    if high is not None:
        parts.append(f"{'at most' if 'maximum' in schema else 'less than'} {high}")
    return "must be " + " and ".join(parts)
