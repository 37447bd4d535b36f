"""One order's state machine: route, build, send, settle.

Per order: ``pending`` -> ``routing`` (quote every venue) -> ``building`` (chosen venue,
quoted price, min_amount_out from max_slippage) -> ``submitted`` (tx_hash) ->
``confirmed`` or ``failed``. Every status change goes through OrderStore.transition,
which refuses duplicates, so two workers (or one worker replaying its own work after
a crash) can never publish a status twice.

Each step is decided by the order's stored status, not by what this process
remembers, so a driver that picks up an order someone else started continues where
it stopped. An order's transaction is built by its venue (signed, with a nonce, on a
chain) and recorded on the order, in one atomic step with its nonce, before it is
sent; a driver resuming a ``building`` order asks the venue about that recorded
transaction and sends those same bytes again if the venue never got them. It never
builds a second transaction for the order, and a venue executes a transaction once
however often it is sent: an order executes at most once. Which entry of the orders stream carries the order, and whether this worker
still owns it, is the consumer's business (engine.execution.consumer).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, NoReturn

from engine.core import amounts
from engine.core.status import InvalidOrderError, Order, OrderStatus
from engine.core.store import (
    BUILDING,
    CONFIRMED,
    FAILED,
    PENDING,
    ROUTING,
    SUBMITTED,
    OrderStore,
    Recorded,
)
from engine.execution.router import Router
from engine.execution.venues.base import (
    SLIPPAGE,
    RejectedSwapError,
    SlippageExceededError,
    SwapRequest,
    SwapTx,
    TransientVenueError,
    TxState,
    TxStatus,
    UnderpricedError,
    UnsupportedPairError,
    Venue,
)

logger = logging.getLogger(__name__)

# Tries per order when venues fail transiently (the first try included).
MAX_ATTEMPTS = 3
# Wait before the second try; doubles for each further one, up to the cap.
RETRY_BACKOFF_SECS = 0.5
RETRY_BACKOFF_MAX_SECS = 30.0
# Asking a venue whether a transaction landed: first after this long, then twice as
# long each time, up to the cap (simulated confirmations take 0.4-1 s).
STATUS_POLL_SECS = 0.05
STATUS_POLL_MAX_SECS = 0.5
# A transaction out and unexecuted this long is replaced (TX_STUCK_SECS); one the
# venue refuses for its fees, after this long; an order's transaction is replaced at
# most this many times (each bump costs: a stalled chain must not run fees up).
STUCK_AFTER_SECS = 60.0
UNDERPRICED_RETRY_SECS = 5.0
MAX_REPLACEMENTS = 5
# An order whose transaction is out and whose entry is past max_deliveries gets this
# long to learn its outcome from the venue before it is left to an operator.
GIVE_UP_SETTLE_SECS = 30.0

OwnerCheck = Callable[[], Awaitable[None]]
# Set by whoever drives the current task's order (the consumer: "is this entry still
# mine?"), called just before a transaction is sent, so that a worker frozen past the
# claim time does not send what the worker that took over is sending. It raises to
# stop the order's work.
owner_check: contextvars.ContextVar[OwnerCheck | None] = contextvars.ContextVar(
    "owner_check", default=None
)


# Set with owner_check: (orders-stream entry id, consumer name) of the current task's
# order. Every status change checks, in the same atomic step, that the entry is
# still this consumer's (OrderStore.transition's ``owned_by``).
owner_entry: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "owner_entry", default=None
)


# Set by the driver when the status change that finished the current task's order
# also acknowledged its orders-stream entry (OrderStore.transition with owned_by): the
# consumer then has nothing left to acknowledge.
entry_acknowledged: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "entry_acknowledged", default=False
)


async def _ensure_owner() -> None:
    check = owner_check.get()
    if check is not None:
        await check()


async def _entry_lost(what: str) -> NoReturn:
    """A step refused because the order's orders-stream entry is another worker's:
    raise what the owner check raises (the consumer's LostEntry), else RuntimeError
    (``what``, and why)."""
    await _ensure_owner()
    raise RuntimeError(f"{what}: its entry is another worker's")


class PoisonEntry(Exception):
    """An orders-stream entry that cannot be processed: it goes to the dead-letter stream."""


_TENTH = Decimal("0.1")


def slippage_reason(moved: Decimal, max_slippage: Decimal) -> str:
    """The failure reason for a price move (fractions), e.g.
    ``Price moved 1.8% (max allowed: 1.0%)``: percentages to one decimal, half up."""
    moved_pct = (moved * 100).quantize(_TENTH, ROUND_HALF_UP)
    max_pct = (max_slippage * 100).quantize(_TENTH, ROUND_HALF_UP)
    if moved_pct <= max_pct:
        # The move did exceed the limit; rounding must not make it read as within it.
        moved_pct = max_pct + _TENTH
    return f"Price moved {moved_pct}% (max allowed: {max_pct}%)"


class OrderDriver:
    """Drives orders through their statuses against ``venues`` (by name), quoting
    through ``router`` and recording every step in ``store``."""

    def __init__(
        self,
        store: OrderStore,
        venues: Mapping[str, Venue],
        router: Router,
        *,
        retry_backoff_secs: float = RETRY_BACKOFF_SECS,
        status_poll_secs: float = STATUS_POLL_SECS,
        stuck_after_secs: float = STUCK_AFTER_SECS,
    ) -> None:
        self.store = store
        self.venues = dict(venues)
        self.router = router
        self.retry_backoff_secs = retry_backoff_secs
        self.status_poll_secs = status_poll_secs
        self.stuck_after_secs = stuck_after_secs

    async def give_up(self, order_id: str, reason: str) -> bool:
        """For an order whose entry keeps coming back: fail it with ``reason`` if that
        cannot hide an executed trade; else learn its outcome from the venue for up
        to GIVE_UP_SETTLE_SECS. True if the order finished that way (its entry may
        be acknowledged); False if it was failed, was already finished or unknown, or
        could not be settled (its entry is for an operator: the order keeps its
        tx_hash)."""
        order = await self.store.get(order_id)
        if order is None or order.terminal:
            return False
        try:
            may_fail = await self._may_fail(order)
        except (RuntimeError, InvalidOrderError):
            may_fail = order.status != SUBMITTED and not order.tx_hash
        if may_fail:
            await self._advance(order, FAILED, reason=reason)
            return False
        if await self._settle_before_giving_up(order):
            return True
        logger.error(
            "order %s: %s with tx %s but its entry keeps failing; left for an operator",
            order_id, order.status, order.tx_hash,
        )
        return False

    async def _settle_before_giving_up(self, order: Order) -> bool:
        """Finish an order whose transaction is out from the venue's answer alone;
        False if that did not work within GIVE_UP_SETTLE_SECS."""
        try:
            final = await asyncio.wait_for(self._drive(order), GIVE_UP_SETTLE_SECS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever kept failing this entry: leave it to a person
            logger.warning("order %s: could not settle before giving up: %r", order.id, exc)
            return False
        logger.info("order %s: settled as %s although its entry was delivered too often",
                    order.id, final.status)
        return final.terminal

    # -- one order ------------------------------------------------------------------

    async def execute(self, order_id: str) -> None:
        """Run the order to a terminal status, retrying transient venue failures.

        Raises PoisonEntry for an unknown order, what the store raises when Redis is
        unreachable (the caller retries: every step resumes from the stored status),
        and what the owner check raises (see ``owner_check``)."""
        order = await self._begin_attempt(order_id)
        last_error: TransientVenueError | None = None
        while not order.terminal:
            attempts = order.attempts
            try:
                order = await self._drive(order)
            except (InvalidOrderError, RejectedSwapError) as exc:
                order = await self._load(order_id)
                if not order.terminal:
                    if isinstance(exc, SlippageExceededError) and order.quoted_price:
                        reason = _moved_reason(order, exc.amount_out)
                    else:
                        reason = _rejection_reason(exc)
                    order = await self._advance(order, FAILED, reason=reason)
                if not order.terminal:
                    order = await self._begin_attempt(order_id)
            except TransientVenueError as exc:
                last_error = exc
                order = await self._load(order_id)
                if order.terminal:
                    break
                if attempts >= MAX_ATTEMPTS and await self._may_fail(order):
                    order = await self._fail_exhausted(order, attempts, exc)
                    break
                delay = min(self.retry_backoff_secs * 2 ** (attempts - 1), RETRY_BACKOFF_MAX_SECS)
                await self.store.count("retries")
                logger.warning("order %s: attempt %s of %s failed (%s); retrying in %.2f s",
                               order_id, attempts, MAX_ATTEMPTS, exc, delay)
                await asyncio.sleep(delay)
                order = await self._begin_attempt(order_id, last_error)

    async def _begin_attempt(self, order_id: str, last_error: TransientVenueError | None = None) -> Order:
        """The order, with one more attempt counted (OrderStore.begin_attempt) if it
        is not finished. With its attempts used up (here, or by a worker before us
        that then died), it fails if failing is safe (``_may_fail``); otherwise it
        goes on all the same, for its transaction may be out."""
        order, counted = await self.store.begin_attempt(order_id, MAX_ATTEMPTS)
        if order is None:
            raise PoisonEntry(f"unknown order id {order_id!r}")
        if counted or order.terminal:
            return order
        if await self._may_fail(order):
            return await self._fail_exhausted(order, order.attempts, last_error)
        attempts = await self.store.count_attempt(order_id)
        return dataclasses.replace(order, attempts=attempts)

    async def _drive(self, order: Order) -> Order:
        """Take the steps from the order's stored status up to a terminal one."""
        while True:
            status = order.status
            if status.terminal:
                return order
            if status == PENDING:
                order = await self._advance(order, ROUTING)
            elif status == ROUTING:
                order = await self._route(order)
            elif status == BUILDING:
                order = await self._send(order)
            elif status == SUBMITTED:
                order = await self._settle(order)
            else:
                raise PoisonEntry(f"order {order.id} has an unknown status {status!r}")

    async def _route(self, order: Order) -> Order:
        request = order.parsed_request()
        sold, bought = request.token_in, request.token_out
        quote = await self.router.best_quote(sold.symbol, bought.symbol, request.amount_in)
        least = amounts.min_amount_out(quote.amount_out, request.max_slippage)
        return await self._advance(
            order,
            BUILDING,
            venue=quote.venue,
            quoted_price=quote.price,
            expected_amount_out=bought.from_base_units(quote.amount_out),
            min_amount_out=bought.from_base_units(least),
        )

    def _venue(self, order: Order) -> Venue:
        venue = self.venues.get(order.venue or "")
        if venue is None:
            # Not a failure of the order: a worker that knows the venue can finish it.
            raise RuntimeError(f"order {order.id} was routed to unknown venue {order.venue!r}")
        return venue

    def _swap(self, order: Order, venue: Venue) -> SwapRequest:
        """The order's swap, from what the ``building`` step stored."""
        request = order.parsed_request()
        try:
            assert order.min_amount_out is not None, "no min_amount_out"
            least = request.token_out.to_base_units(order.min_amount_out)
        except (AssertionError, ArithmeticError, ValueError) as exc:
            raise RuntimeError(f"order {order.id} has no usable min_amount_out ({exc!r})") from None
        return SwapRequest(
            order_id=order.id,
            venue=venue.name,
            token_in=request.token_in.symbol,
            token_out=request.token_out.symbol,
            amount_in=request.amount_in,
            min_amount_out=least,
        )

    def _recorded(self, order: Order) -> tuple[SwapTx, Venue] | None:
        """The order's recorded transaction and its venue; None if none is recorded."""
        if not order.tx_hash:
            return None
        venue = self._venue(order)
        if order.tx is None:
            # Recorded before transactions were (by a worker older than issue 14): a
            # simulated venue's transaction is a pure function of the order.
            swap = self._swap(order, venue)
            legacy = SwapTx.build(swap.order_id, swap.venue, swap.token_in, swap.token_out,
                                  swap.amount_in, swap.min_amount_out)
            if legacy.tx_hash == order.tx_hash:
                return legacy, venue
        try:
            tx = SwapTx.from_record(order.tx or "")
        except ValueError as exc:
            # Not a failure of the order either: its transaction may be out.
            raise RuntimeError(f"order {order.id} has an unreadable transaction ({exc})") from None
        if tx.tx_hash != order.tx_hash:
            raise RuntimeError(f"order {order.id} records tx {order.tx_hash}, its record {tx.tx_hash}")
        return tx, venue

    async def _build_and_record(self, order: Order) -> SwapTx | None:
        """Build the order's transaction and record it (with its nonce) before it is
        sent; None if the order stopped building meanwhile (a client's cancel came
        first, or another worker recorded its own). Raises SlippageExceededError from
        the venue's pre-flight."""
        venue = self._venue(order)

        async def record(tx: SwapTx) -> Recorded:
            # A worker frozen past the claim time must not record: the one that took
            # the order over may be recording its own. Checked in the recording step.
            claim = tx.nonce
            recorded = await self.store.record_tx(
                order.id,
                tx.tx_hash,
                tx.record(),
                nonce_key=claim.key if claim else None,
                nonce=claim.nonce if claim else None,
                ledger_key=claim.ledger if claim else None,
                raw=tx.raw,
                owned_by=owner_entry.get(),
            )
            if recorded is Recorded.LOST:
                await _entry_lost(f"order {order.id}: not recorded")
            return recorded

        return await venue.build(self._swap(order, venue), record)

    async def _send(self, order: Order) -> Order:
        recorded = self._recorded(order)
        if recorded is not None:
            # Someone (perhaps a worker that died) got this far: did the tx go out?
            tx, venue = recorded
            if (await venue.status(tx)).state is TxState.UNKNOWN:
                await self._send_out(order, venue, [tx])
        else:
            # Recorded before sending, so whoever resumes this order sends the same
            # transaction; and only while the order is still building, so a client's
            # cancel that came first wins and nothing is sent.
            built = await self._build_and_record(order)
            if built is None:
                current = await self._load(order.id)
                logger.info("order %s: %s with tx %s; not sending ours",
                            order.id, current.status, current.tx_hash)
                return current
            tx, venue = built, self._venue(order)
            order = dataclasses.replace(order, tx_hash=tx.tx_hash, tx=tx.record())
            await self._send_out(order, venue, [tx])
        return await self._advance(order, SUBMITTED, tx_hash=tx.tx_hash, venue=venue.name)

    async def _settle(self, order: Order) -> Order:
        """Wait for the venue's verdict on the order's transaction, or on any one it
        replaced (same nonce: at most one of them executes); send it again if the
        venue lost it; replace it (``Venue.speed_up``) if it stays unexecuted for
        ``stuck_after_secs``, or sooner if the venue refuses it for its fees, at most
        MAX_REPLACEMENTS times."""
        candidates = self._candidates(order)
        venue = self._venue(order)
        delay = self.status_poll_secs
        replace_at = time.monotonic() + self.stuck_after_secs
        tried_at = -math.inf
        while True:
            landed, statuses = await self._verdict(order, venue, candidates)
            if landed is not None:
                return await self._finish(order, venue, *landed)
            if all(s is not None and s.state is TxState.UNKNOWN for s in statuses):
                # The venue lost it (or never got it): sending is idempotent.
                logger.warning("order %s: venue %s does not know %s; sending it again",
                               order.id, venue.name, candidates[0].tx_hash)
                if not await self._send_out(order, venue, candidates):  # its fees are too low now
                    replace_at = min(replace_at, tried_at + UNDERPRICED_RETRY_SECS)
            waiting = any(s is not None and s.included for s in statuses)  # executed, not deep yet
            now = time.monotonic()
            if now >= replace_at and not waiting and len(candidates) <= MAX_REPLACEMENTS:
                tried_at, replace_at = now, now + self.stuck_after_secs
                await self._speed_up(order, venue, candidates[0])
                # As recorded: ours, or one by a worker that took the order over.
                order = await self._load(order.id)
                if order.terminal:
                    return order
                candidates = self._candidates(order)
                await self._send_out(order, venue, candidates)
            await asyncio.sleep(delay)
            delay = min(delay * 2, STATUS_POLL_MAX_SECS)

    def _candidates(self, order: Order) -> list[SwapTx]:
        """The order's transaction, then those it replaced, newest first."""
        recorded = self._recorded(order)
        if recorded is None:
            raise RuntimeError(f"order {order.id} is {order.status} with no recorded transaction")
        return [recorded[0], *self._replaced(order)]

    async def _send_out(self, order: Order, venue: Venue, candidates: list[SwapTx]) -> bool:
        """Send the newest candidate, if the entry is still ours; False if the venue
        refused it for its fees (logged: it was recorded, so it counts as out, and
        settling replaces it with a faster one). If the venue says its nonce went to
        another transaction, one of the older candidates may be that one: only when
        none of them executed does the RejectedSwapError stand (and fail the order)."""
        await _ensure_owner()
        try:
            await venue.send(candidates[0])
        except UnderpricedError as exc:
            logger.warning("order %s: %s", order.id, exc)
            return False
        except RejectedSwapError:
            landed, _ = await self._verdict(order, venue, candidates)
            if landed is None:
                raise
        return True

    async def _verdict(
        self, order: Order, venue: Venue, candidates: list[SwapTx]
    ) -> tuple[tuple[SwapTx, TxStatus] | None, list[TxStatus | None]]:
        """Each candidate's status (None: the venue did not answer); the one that
        executed or reverted, if any."""
        statuses: list[TxStatus | None] = []
        for candidate in candidates:
            try:
                status = await venue.status(candidate)
            except TransientVenueError as exc:
                # The tx is out: failing the order now could be a lie. Keep asking.
                logger.warning("order %s: status of %s unavailable (%s)", order.id, candidate.tx_hash, exc)
                status = None
            if status is not None and status.state in (TxState.CONFIRMED, TxState.REVERTED):
                return (candidate, status), statuses
            statuses.append(status)
        return None, statuses

    async def _finish(self, order: Order, venue: Venue, tx: SwapTx, status: TxStatus) -> Order:
        if status.state is TxState.CONFIRMED:
            assert status.amount_out is not None
            sold, bought = amounts.token(tx.token_in), amounts.token(tx.token_out)
            return await self._advance(
                order,
                CONFIRMED,
                tx_hash=tx.tx_hash,
                execution_price=amounts.price(tx.amount_in, sold, status.amount_out, bought),
                amount_out=bought.from_base_units(status.amount_out),
                venue=venue.name,
            )
        return await self._advance(
            order, FAILED, reason=self._revert_reason(order, status), tx_hash=tx.tx_hash, venue=venue.name
        )

    async def _speed_up(self, order: Order, venue: Venue, stuck: SwapTx) -> SwapTx | None:
        """The venue's replacement of ``stuck``, recorded on the order (None: none)."""

        async def record(faster: SwapTx) -> Recorded:
            await _ensure_owner()
            claim = faster.nonce
            if claim is None:
                return Recorded.NOT_BUILDING  # only a transaction with a nonce is replaced
            return await self.store.record_replacement(
                order.id, stuck.tx_hash, faster.tx_hash, faster.record(),
                ledger_key=claim.ledger, nonce=claim.nonce, raw=faster.raw,
            )

        try:
            faster = await venue.speed_up(stuck, record)
        except TransientVenueError as exc:
            logger.warning("order %s: could not replace %s: %s", order.id, stuck.tx_hash, exc)
            return None
        if faster is not None:
            logger.warning("order %s: %s unexecuted after %.0f s; replaced by %s (same nonce, higher fees)",
                           order.id, stuck.tx_hash, self.stuck_after_secs, faster.tx_hash)
        return faster

    def _replaced(self, order: Order) -> list[SwapTx]:
        """The transactions the order's current one replaced, newest first."""
        try:
            return [SwapTx.from_record(text) for text in reversed(json.loads(order.tx_prior or "[]"))]
        except (ValueError, TypeError) as exc:
            raise RuntimeError(f"order {order.id} has unreadable replaced transactions ({exc})") from None

    @staticmethod
    def _revert_reason(order: Order, status: TxStatus) -> str:
        if status.reason == SLIPPAGE and status.amount_out is not None and order.quoted_price:
            return _moved_reason(order, status.amount_out)
        return f"Transaction reverted: {status.reason or 'no reason given'}"

    async def _may_fail(self, order: Order) -> bool:
        """Whether failing the order now is certain not to hide an executed trade,
        nor to leave a recorded nonce unused (a gap would stall every later
        transaction of the account: such a transaction goes out and settles)."""
        if order.status == SUBMITTED:
            return False
        recorded = self._recorded(order) if order.status == BUILDING else None
        if recorded is None:
            return True
        tx, venue = recorded
        if tx.nonce is not None:
            return False
        try:
            return (await venue.status(tx)).state is TxState.UNKNOWN
        except TransientVenueError:
            return False

    async def _fail_exhausted(
        self, order: Order, attempts: int, error: TransientVenueError | None
    ) -> Order:
        detail = f": {error}" if error is not None else ""
        return await self._advance(
            order, FAILED, reason=f"Retries exhausted after {attempts} attempts{detail}"
        )

    async def _load(self, order_id: str) -> Order:
        order = await self.store.get(order_id)
        if order is None:
            raise PoisonEntry(f"unknown order id {order_id!r}")
        return order

    async def _advance(self, order: Order, status: OrderStatus, **fields: Any) -> Order:
        """Transition the order; the order as it now is (whoever moved it)."""
        order_id = order.id
        # A worker frozen past the claim time, thawed, must not move an order the
        # worker that took it over is driving: the transition checks the entry is
        # still ours in the same atomic step.
        result = await self.store.transition(order_id, status, owned_by=owner_entry.get(), **fields)
        if result.lost:
            await _entry_lost(f"order {order_id}: {status} refused")
        if result.applied:
            if result.acknowledged:
                entry_acknowledged.set(True)
            details = "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
            logger.info("order %s: %s -> %s%s", order_id, order.status, status, details)
            return order.moved(status, fields)
        current = await self._load(order_id)
        if current.status == order.status:
            raise RuntimeError(f"order {order_id}: {order.status} -> {status} was refused")
        # Another worker took the step (or a further one): carry on from there.
        logger.info("order %s: already %s (wanted %s)", order_id, current.status, status)
        return current


def _moved_reason(order: Order, would_pay: int) -> str:
    """The seed's slippage reason for an order whose swap would now pay
    ``would_pay`` base units of token_out, against the price quoted at routing."""
    request = order.parsed_request()
    price_now = amounts.price(request.amount_in, request.token_in, would_pay, request.token_out)
    quoted = order.quoted_price
    assert quoted, "an order past routing has a quoted price"
    return slippage_reason((quoted - price_now) / quoted, request.max_slippage)


def _rejection_reason(error: Exception) -> str:
    if isinstance(error, (InvalidOrderError, UnsupportedPairError)):
        return str(error)
    return f"The venue refused the swap: {error}"
