"""Strict JSON decoding for request bodies.

Python's ``json.loads`` accepts ``NaN``, ``Infinity``, numbers that overflow to
infinity and duplicate keys (the last one silently wins). None of that is JSON a
client should be able to send us, so each is an error here.
"""

from __future__ import annotations

import json
import math
from typing import Any


class InvalidJSON(ValueError):
    """The body is not strict JSON; the message says why, for the client."""


def _reject_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidJSON(f"the number {text[:40]} is too large")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSON(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads(body: bytes) -> Any:
    """Decode a UTF-8 JSON document strictly; raise InvalidJSON with a readable reason."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"the body is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise InvalidJSON("the body starts with a byte order mark")
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )
    except InvalidJSON:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        # int() refuses numbers of more than 4300 digits; deep nesting recurses.
        raise InvalidJSON(f"the body could not be decoded: {str(exc)[:80]}") from None
