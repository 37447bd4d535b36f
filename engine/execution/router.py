"""Smart order routing: ask every venue at once, take the best net output."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

from engine.execution.venues.base import (
    Quote,
    RejectedSwapError,
    TransientVenueError,
    UnsupportedPairError,
    Venue,
    VenueError,
)

logger = logging.getLogger(__name__)

# A venue that has not quoted by then is treated as down for this order; the others'
# quotes are used. Real DEX quotes take 50-300 ms.
QUOTE_TIMEOUT_SECS = 2.0


class Router:
    """Quotes every venue concurrently and picks the one that pays the most."""

    def __init__(
        self, venues: Mapping[str, Venue] | Iterable[Venue], *, timeout_secs: float = QUOTE_TIMEOUT_SECS
    ) -> None:
        if isinstance(venues, Mapping):
            self.venues: dict[str, Venue] = dict(venues)
        else:
            self.venues = {venue.name: venue for venue in venues}
        if not self.venues:
            raise ValueError("a router needs at least one venue")
        self.timeout_secs = timeout_secs

    async def quotes(
        self, token_in: str, token_out: str, amount_in: int
    ) -> tuple[list[Quote], dict[str, BaseException]]:
        """Every venue's quote for ``amount_in`` base units of ``token_in``, and every
        venue's error, by venue name."""
        names = list(self.venues)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(self.venues[name].quote(token_in, token_out, amount_in), self.timeout_secs)
                for name in names
            ),
            return_exceptions=True,
        )
        quotes: list[Quote] = []
        errors: dict[str, BaseException] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Quote):
                quotes.append(result)
            elif isinstance(result, asyncio.CancelledError):
                # Our own cancellation (shutdown), not the venue's failure.
                raise result
            elif isinstance(result, TimeoutError):
                errors[name] = TransientVenueError(
                    f"{name}: no quote within {self.timeout_secs:g} s"
                )
            else:
                errors[name] = result
        return quotes, errors

    async def best_quote(self, token_in: str, token_out: str, amount_in: int) -> Quote:
        """The quote with the most token_out for ``amount_in`` base units of
        ``token_in``, net of fees and price impact (amounts are exact integers, so
        "most" is exact too).

        Raises TransientVenueError when no venue answered and at least one might next
        time, and RejectedSwapError (UnsupportedPairError when no venue has the pair)
        when every venue refused the swap for good.
        """
        quotes, errors = await self.quotes(token_in, token_out, amount_in)
        for name, error in errors.items():
            if not isinstance(error, VenueError):
                # A bug in an adapter must not stop trading on the other venues.
                logger.warning("venue %s failed to quote: %r", name, error, exc_info=error)
        if quotes:
            # Ties go to the first venue by name, so routing is deterministic.
            best = max(sorted(quotes, key=lambda q: q.venue), key=lambda q: q.amount_out)
            logger.debug(
                "routed %s base units %s->%s to %s (%s)",
                amount_in,
                token_in,
                token_out,
                best.venue,
                ", ".join(f"{q.venue}={q.amount_out}" for q in quotes),
            )
            return best
        summary = "; ".join(f"{_short(name, error)}" for name, error in sorted(errors.items()))
        rejections = {n: e for n, e in errors.items() if isinstance(e, RejectedSwapError)}
        if len(rejections) == len(errors):
            if all(isinstance(e, UnsupportedPairError) for e in rejections.values()):
                raise UnsupportedPairError(f"No venue offers a {token_in}/{token_out} pool")
            raise RejectedSwapError(summary)
        raise TransientVenueError(f"no venue could quote {token_in}->{token_out} ({summary})")


def _short(name: str, error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}"
