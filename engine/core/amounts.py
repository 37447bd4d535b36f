"""Tokens and exact amounts: whole tokens as ``Decimal``, base units as ``int``.

A token's smallest unit is ``10 ** -decimals`` of a whole token (a lamport is
``1e-9`` SOL, as the token's mint defines it on Solana). Amounts cross every module
boundary exactly: a client's ``amount`` is a ``Decimal`` parsed from the JSON text
(engine.core.strict_json), venues and the router work in integer base units, and what the
service reports goes back to whole tokens with ``from_base_units``, exactly.

The decimals are defined once, in ``schemas/common.json`` (``$defs/token``,
``x-decimals``), so the schema a client reads, the docs built from it and this code
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from engine.core.config import PROJECT_ROOT

COMMON_SCHEMA = PROJECT_ROOT / "schemas" / "common.json"

# Significant digits of a reported price (quoted_price, execution_price): a price is
# a ratio of two exact amounts, and ten digits say more than any venue's precision.
PRICE_DIGITS = 10
_PRICE_CONTEXT = Context(prec=PRICE_DIGITS, rounding=ROUND_HALF_EVEN)
# Whole-token amounts this large (10**30) are refused before being scaled: the
# order schema allows at most 1e9, and a hostile 1e999999 must not build a
# million-digit integer.
_MAX_WHOLE_DIGITS = 30


class AmountError(ValueError):
    """An amount a token cannot hold: finer than its smallest unit, negative, not
    finite, or absurdly large. The message is for the client."""


@dataclasses.dataclass(frozen=True)
class Token:
    """A token and its decimals: ``amount`` whole tokens are ``amount * 10**decimals``
    base units."""

    symbol: str
    decimals: int

    @property
    def unit(self) -> Decimal:
        """The smallest amount of the token, in whole tokens (``0.000001`` for USDC)."""
        return Decimal((0, (1,), -self.decimals))

    def to_base_units(self, amount: Decimal | int) -> int:
        """Whole tokens to base units, exactly (``Decimal("1.5")`` SOL is 1500000000).

        Raises AmountError if ``amount`` is finer than one base unit, negative, not
        finite, or 10**30 whole tokens or more."""
        if isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
            raise AmountError(f"{amount!r} is not a number")
        if isinstance(amount, int):
            amount = Decimal(amount)
        if not amount.is_finite():
            raise AmountError(f"{amount} is not a finite number")
        sign, digits, exponent = amount.as_tuple()
        assert isinstance(exponent, int)
        count = len(digits)
        while count > 1 and digits[count - 1] == 0:  # 1.500 is 15 tenths
            count, exponent = count - 1, exponent + 1
        if digits[:count] == (0,):
            return 0
        if sign:
            raise AmountError(f"{amount} is negative")
        if exponent < -self.decimals:
            raise AmountError(
                f"{amount} {self.symbol} is finer than its smallest unit, {self.unit:f} "
                f"({self.symbol} has {self.decimals} decimals)"
            )
        if count + exponent > _MAX_WHOLE_DIGITS:
            raise AmountError(f"{amount} {self.symbol} is too large")
        units = 0
        for digit in digits[:count]:
            units = units * 10 + digit
        return units * int(10 ** (exponent + self.decimals))

    def from_base_units(self, units: int) -> Decimal:
        """Base units to whole tokens, exactly, with the token's decimals shown
        (1500000000 lamports is ``Decimal("1.500000000")`` SOL)."""
        return Decimal(f"{units}E-{self.decimals}")  # from text: exact, no rounding


def price(amount_in: int, token_in: Token, amount_out: int, token_out: Token) -> Decimal:
    """token_out per token_in for a swap of ``amount_in`` for ``amount_out`` (both in
    base units), to PRICE_DIGITS significant digits, trailing zeros dropped.

    Raises AmountError if ``amount_in`` is not positive."""
    if amount_in <= 0:
        raise AmountError("a price needs a positive amount in")
    ratio = _PRICE_CONTEXT.divide(
        Decimal(f"{amount_out}E{token_in.decimals - token_out.decimals}"), Decimal(amount_in)
    )
    return _PRICE_CONTEXT.normalize(ratio)


def min_amount_out(expected: int, max_slippage: Decimal) -> int:
    """The least ``token_out`` (base units) a swap may pay: ``expected`` less
    ``max_slippage`` (a fraction), rounded down, exactly; at least one unit, since
    a swap that may pay nothing is no trade (the amountOutMin of Uniswap V2's
    ``swapExactTokensForTokens``)."""
    numerator, denominator = max_slippage.as_integer_ratio()
    return max(1, expected * (denominator - numerator) // denominator)


@functools.cache
def tokens() -> Mapping[str, Token]:
    """Every supported token by symbol, from ``schemas/common.json``."""
    definition: dict[str, Any] = json.loads(COMMON_SCHEMA.read_bytes())["$defs"]["token"]
    decimals: dict[str, int] = definition["x-decimals"]
    if sorted(decimals) != sorted(definition["enum"]):
        raise RuntimeError(f"{COMMON_SCHEMA}: x-decimals must list exactly the token enum")
    return {symbol: Token(symbol, decimals[symbol]) for symbol in definition["enum"]}


def token(symbol: str) -> Token:
    """The token ``symbol``; KeyError if it is not supported."""
    return tokens()[symbol]


def amount_errors(order: Mapping[str, Any]) -> list[dict[str, str]]:
    """What is wrong with a schema-valid order's ``amount`` given its ``token_in``'s
    decimals: ``[{"field": "amount", "message"}]``, or [] if it is a whole number of
    base units."""
    try:
        token(order["token_in"]).to_base_units(order["amount"])
    except AmountError as exc:
        return [{"field": "amount", "message": str(exc)}]
    return []
