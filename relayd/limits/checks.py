"""What a limit check asks of a state store, and what the store answers.

Three kinds of counter, the same in every store:

- :class:`WindowCheck`: a rolling 60-second window kept as 1-second buckets. A request
  (or its token reservation) is counted in the bucket of the second it was admitted and
  leaves the window 60 seconds later, so "N per minute" holds over *any* 60 seconds,
  not just per calendar minute.
- :class:`PeriodCheck`: a calendar budget (a UTC day or a UTC month) that resets when
  the period changes.
- :class:`ConcurrencyCheck`: leases on in-flight requests; a lease expires by itself
  after ``ttl`` seconds so an instance that dies cannot leak slots for ever.

A store evaluates every check of a request together and applies them all or none
(:meth:`~relayd.limits.store.LimitStore.admit`). Token checks reserve an estimate; the
:class:`Ticket` remembers where each reservation went so it can be settled to the
actual usage (:class:`Adjustment`) when the response ends.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field

WINDOW_SECONDS = 60
DAY = "day"
MONTH = "month"


@dataclass(frozen=True, slots=True)
class WindowCheck:
    """Consume ``amount`` of a per-minute ``limit`` held under ``key``."""

    key: str
    limit: int
    amount: int
    name: str  # the config key it enforces, e.g. "requests_per_minute"
    scope: str  # "client" or "upstream"

    kind = "w"

    @property
    def unit(self) -> str:
        """What the window counts: ``requests`` or ``tokens``."""
        return "requests" if self.name == "requests_per_minute" else "tokens"


@dataclass(frozen=True, slots=True)
class PeriodCheck:
    """Consume ``amount`` of a per-``period`` (``day``/``month``, UTC) budget."""

    key: str
    limit: int
    amount: int
    name: str
    scope: str
    period: str = DAY

    kind = "p"


@dataclass(frozen=True, slots=True)
class ConcurrencyCheck:
    """Take one of ``limit`` concurrent slots under ``key`` as lease ``lease``."""

    key: str
    limit: int
    lease: str
    ttl: float
    name: str
    scope: str

    kind = "c"


Check = WindowCheck | PeriodCheck | ConcurrencyCheck


@dataclass(frozen=True, slots=True)
class CheckState:
    """A check's counter after admission: how much is used and when it is fully free.

    ``slot`` is where the amount was recorded (the bucket second of a window, the period
    number of a budget), for settling later. ``reset_after`` is seconds until everything
    now counted has left the window (or the period ends).
    """

    used: int
    slot: int
    reset_after: float


@dataclass(slots=True)
class Decision:
    """The answer to one admission.

    When refused, ``failed`` is the first check that did not fit and ``retry_after``
    the seconds until it would (``None`` when it never will in its current period:
    a budget). When admitted, ``states`` lines up with the checks asked.
    """

    allowed: bool
    checks: tuple[Check, ...]
    states: tuple[CheckState, ...] = ()
    failed: Check | None = None
    retry_after: float | None = None
    store: str = ""  # which store decided ("memory", "redis", "fallback")
    degraded: bool = False  # decided without the shared store (it was unreachable)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Add ``delta`` (may be negative) to the reservation recorded in ``slot``."""

    key: str
    kind: str  # "w" or "p"
    slot: int
    delta: int


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds until it ends: its reservations and leases."""

    decision: Decision
    reservations: list[tuple[Check, CheckState]] = field(default_factory=list)

    @classmethod
    def of(cls, decision: Decision) -> Ticket:
        ticket = cls(decision)
        ticket.reservations = list(zip(decision.checks, decision.states, strict=True))
        return ticket

    def settle(
        self, outcomes: dict[str, tuple[int, bool]]
    ) -> tuple[list[Adjustment], list[ConcurrencyCheck]]:
        """Adjustments that turn token reservations into actual usage, and the leases to
        release.

        ``outcomes`` maps a check's scope (``client``, ``upstream``) to (tokens used,
        final): a final count replaces the reservation; a partial one (a stream that was
        cut off before its usage arrived) only raises it.
        """
        adjustments: list[Adjustment] = []
        releases: list[ConcurrencyCheck] = []
        for check, state in self.reservations:
            if isinstance(check, ConcurrencyCheck):
                releases.append(check)
            elif check.name.startswith("tokens"):
                used, final = outcomes[check.scope]
                delta = (used if final else max(used, check.amount)) - check.amount
                if delta:
                    adjustments.append(Adjustment(check.key, check.kind, state.slot, delta))
        self.reservations = []
        return adjustments, releases


def period_number(period: str, epoch_seconds: float) -> int:
    """The UTC day number since 1970 (``day``) or ``year * 12 + month - 1`` (``month``)."""
    day = int(epoch_seconds // 86400)
    if period == DAY:
        return day
    year, month = civil_from_days(day)
    return year * 12 + month - 1


def period_end(period: str, number: int) -> float:
    """Epoch seconds at which period ``number`` ends."""
    if period == DAY:
        return (number + 1) * 86400.0
    year, month0 = divmod(number + 1, 12)
    return float(calendar.timegm((year, month0 + 1, 1, 0, 0, 0)))


def civil_from_days(days: int) -> tuple[int, int]:
    """(year, month) of a day number since 1970-01-01 (H. Hinnant's algorithm, mirrored
    in the Redis script so both stores agree)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if month <= 2 else y), month
