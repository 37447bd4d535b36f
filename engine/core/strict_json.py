"""Strict JSON in, exact and valid JSON out.

In: Python's ``json.loads`` accepts ``NaN``, ``Infinity``, numbers that overflow to
infinity, duplicate keys (the last one silently wins) and ``\\ud800``-style escapes
of lone UTF-16 surrogates, which no UTF-8 text can hold. None of that is JSON a
client should be able to send us (RFC 8259 sections 4, 6 and 8.2), so each is an
error here. Numbers with a fraction or an exponent become ``Decimal`` with exactly
the value written: money is never a binary float (``0.1`` stays one tenth).

Out: ``dumps`` writes UTF-8 JSON with every ``Decimal`` as the exact number it
holds, and never a lone surrogate, whatever data it is given, so strict parsers
(orjson, serde_json) can read every answer of the service.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson


class InvalidJSON(ValueError):
    """The body is not strict JSON; the message says why, for the client."""


def _reject_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSON(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads(body: bytes | str) -> Any:
    """Decode a UTF-8 JSON document strictly; raise InvalidJSON with a readable reason.

    Integers come back as ``int``, other numbers as ``Decimal`` (exact, never
    infinite), strings never hold a lone surrogate."""
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJSON(f"the body is not valid UTF-8 (byte {exc.start})") from None
    else:
        text = body
    if text.startswith("\ufeff"):
        raise InvalidJSON("the body starts with a byte order mark")
    try:
        document = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=Decimal,
            object_pairs_hook=_no_duplicates,
        )
    except InvalidJSON:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ArithmeticError:
        # Decimal() refuses an exponent beyond its range (InvalidOperation).
        raise InvalidJSON("a number's exponent is out of range") from None
    except (ValueError, RecursionError) as exc:
        # int() refuses numbers of more than 4300 digits; deep nesting recurses.
        raise InvalidJSON(f"the body could not be decoded: {str(exc)[:80]}") from None
    # A surrogate can only arrive as a \u escape (strict UTF-8 cannot encode one);
    # a valid pair is joined into one code point by the decoder, a lone one is not.
    if "\\u" in text and _has_lone_surrogate(document):
        raise InvalidJSON("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)")
    return document


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    # Iterative, so a deeply nested document cannot exhaust the stack here.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# Beyond this many digits from the decimal point, plain notation would be long
# (1e999999 has a million digits): such a number is written with an exponent.
_PLAIN_MAX_EXPONENT = 60


def number_text(value: Decimal | int) -> str:
    """The JSON text of an exact number, in plain notation: ``Decimal("1E-9")`` is
    ``0.000000001``, trailing zeros are kept (``1.50`` stays ``1.50``); a number
    beyond 1e60 or below 1e-60 keeps an exponent (``1E+400``), still exact.

    Raises ValueError for NaN or an infinity (not JSON numbers)."""
    if isinstance(value, int):
        return str(value)
    if not value.is_finite():
        raise ValueError(f"{value} is not a JSON number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    # A zero has no "adjusted" size, but 0E-99999 would still print 99,999 zeros.
    if abs(exponent) > _PLAIN_MAX_EXPONENT or (value and abs(value.adjusted()) > _PLAIN_MAX_EXPONENT):
        return str(value)
    return format(value, "f")


def exact_normal(value: Decimal) -> Decimal:
    """``value`` without trailing zeros (``2.50`` -> ``2.5``, ``20`` -> ``2E+1``),
    exactly: ``Decimal.normalize`` rounds to the context's 28 digits."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN or an infinity
        return value
    count = len(digits)
    while count > 1 and digits[count - 1] == 0:
        count -= 1
    if count == 1 and digits[0] == 0:
        return Decimal(0)
    return Decimal((sign, digits[:count], exponent + len(digits) - count))


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(number_text(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(document: Any, *, sort_keys: bool = False) -> bytes:
    """``document`` as compact UTF-8 JSON: Decimals exactly, never a lone surrogate
    (each becomes U+FFFD), integers of any size.

    Raises TypeError for a value JSON cannot hold (a set, an object...), and for
    nesting deeper than orjson's 254 levels (nothing the service sends comes close)."""
    option = orjson.OPT_SORT_KEYS if sort_keys else 0
    try:
        return orjson.dumps(document, default=_default, option=option)
    except TypeError:
        # orjson refuses lone surrogates and integers beyond 64 bits; both are rare
        # enough (our own output never has them) to take a slower second pass.
        return orjson.dumps(_sanitized(document), default=_default, option=option)


def _sanitized(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return orjson.Fragment(str(value))
    if isinstance(value, dict):
        return {_sanitized(key): _sanitized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitized(item) for item in value]
    return value


def dumps_text(document: Any, *, sort_keys: bool = False) -> str:
    """``dumps`` as a ``str``."""
    return dumps(document, sort_keys=sort_keys).decode("utf-8")


def canonical(document: Any) -> str:
    """One text for every spelling of the same JSON value, in the manner of RFC 8785
    (JCS): keys sorted, no whitespace, and every number in its shortest exact form,
    so ``2``, ``2.0``, ``2e0`` and ``20E-1`` are all ``2`` and ``0.050`` is ``0.05``.
    (JCS itself writes numbers as IEEE doubles would print; ours stay exact.)"""
    return dumps_text(_normal_numbers(document), sort_keys=True)


def _normal_numbers(value: Any) -> Any:
    if isinstance(value, Decimal):
        return exact_normal(value)
    if isinstance(value, dict):
        return {key: _normal_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normal_numbers(item) for item in value]
    return value


def raw(text: str | bytes) -> orjson.Fragment:
    """JSON text that ``dumps`` embeds as it is (e.g. a status message as stored)."""
    return orjson.Fragment(text)
