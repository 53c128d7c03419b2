"""Admission by tenant: the deployment's quotas (core/spec.py ``QuotaSpec``) as token
buckets over scored rows and a cap on rows in flight, per worker process.

A tenant's entry overrides the fields it sets; the rest come from the ``"*"`` entry; a
tenant with neither is unlimited.  ``burst_rows`` goes with the rate it bursts: it comes
from the entry that gave ``rows_per_second``, else it is two seconds of that rate.

**Per worker.** Each of the server's N workers holds 1/N of every limit (rate, burst and
rows in flight, rounded up), with no coordination between them: the kernel spreads
connections over the workers, so a tenant reaches its whole limit when its traffic comes
over several connections, and about 1/N of it over one keep-alive connection.  Exact
server-wide limits would need state shared between the workers on every request.

**Admission.** A request is admitted while its tenant's bucket is not empty, and then
takes its rows from it, so the bucket may go into debt: a request larger than the burst
still gets through, alone, and the tenant waits the debt out.  Over quota is a 429 with
Retry-After (the seconds until the bucket refills past zero).  It is decided before the
body is read when the key names the tenant (an empty bucket, or rows in flight at the
cap), and again once the rows are counted.  In flight: admitted and not yet answered; a
request may always go when the tenant has nothing in flight, however large."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from muse.calib.names import DEFAULT_TENANT
from muse.core.spec import PRIORITY_WEIGHTS, QuotaSpec

from .errors import HTTPError

DEFAULT_PRIORITY = "normal"
MAX_TENANTS = 100_000  # tenant names come from requests (admin keys name any): idle ones are forgotten
BURST_SECONDS = 2.0  # burst_rows when the entry gives none: this many seconds of the rate


@dataclass(frozen=True)
class Limits:
    """One tenant's limits in this worker."""

    rows_per_second: float | None  # None: no rate limit
    burst_rows: float
    max_inflight_rows: int | None  # None: no cap
    weight: int  # the tenant's share of a busy model (core/batching.py)


UNLIMITED = Limits(None, math.inf, None, PRIORITY_WEIGHTS[DEFAULT_PRIORITY])


class TenantState:
    """A tenant's bucket and rows in flight in this worker."""

    __slots__ = ("inflight", "limits", "tokens", "updated")

    def __init__(self, limits: Limits, now: float):
        self.limits = limits
        self.tokens = limits.burst_rows
        self.updated = now
        self.inflight = 0

    def refill(self, now: float) -> None:
        rate = self.limits.rows_per_second
        if rate is not None:
            self.tokens = min(self.limits.burst_rows, self.tokens + (now - self.updated) * rate)
        self.updated = now


class Quotas:
    """Every tenant's buckets in this worker process.  Event loop only."""

    def __init__(self, workers: int = 1, clock: Callable[[], float] = time.monotonic):
        self.workers = workers
        self.clock = clock
        self.generation: int | None = None  # the deployment whose quotas are in force
        self._entries: dict[str, QuotaSpec] = {}
        self._tenants: dict[str, TenantState] = {}
        self._next_sweep = MAX_TENANTS  # table size at which idle tenants are next forgotten

    def configure(self, quotas: list[QuotaSpec], generation: int) -> None:
        """Take a new deployment's quotas.  A tenant keeps its bucket's level (debt included) and
        its rows in flight; new limits change how fast it refills and how far."""
        self._entries = {q.tenant: q for q in quotas}
        self.generation = generation
        now = self.clock()
        for name, tenant in self._tenants.items():
            limits = self.limits(name)
            if limits != tenant.limits:  # changed in place: requests in flight hold this object
                tenant.refill(now)
                tenant.limits = limits
                tenant.tokens = min(tenant.tokens, limits.burst_rows)  # new limits forgive no debt

    def limits(self, tenant: str) -> Limits:
        entries = [e for e in (self._entries.get(tenant), self._entries.get(DEFAULT_TENANT)) if e is not None]
        if not entries:
            return UNLIMITED
        n = self.workers
        rated = next((e for e in entries if e.rows_per_second is not None), None)
        rate = burst = None
        if rated is not None and rated.rows_per_second is not None:
            rate = rated.rows_per_second / n
            whole = rated.burst_rows if rated.burst_rows is not None else BURST_SECONDS * rated.rows_per_second
            burst = math.ceil(whole / n)
        inflight = next((e.max_inflight_rows for e in entries if e.max_inflight_rows is not None), None)
        priority = next((e.priority for e in entries if e.priority is not None), DEFAULT_PRIORITY)
        return Limits(
            rate,
            math.inf if burst is None else burst,
            None if inflight is None else math.ceil(inflight / n),
            PRIORITY_WEIGHTS[priority],
        )

    def _tenant(self, tenant: str) -> TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            if len(self._tenants) >= self._next_sweep:
                self._forget_idle()
                # the next sweep when the table has doubled: each costs O(table), so O(1) a tenant
                self._next_sweep = max(MAX_TENANTS, 2 * len(self._tenants))
            state = self._tenants[tenant] = TenantState(self.limits(tenant), self.clock())
        return state

    def _forget_idle(self) -> None:
        """Drop tenants with nothing in flight and a full bucket: they would be made again the same."""
        now = self.clock()
        for name, state in list(self._tenants.items()):
            state.refill(now)
            if state.inflight == 0 and (state.limits is UNLIMITED or state.tokens >= state.limits.burst_rows):
                del self._tenants[name]

    def weight(self, tenant: str) -> int:
        return self._tenant(tenant).limits.weight

    def check(self, tenant: str, field: str) -> None:
        """Before the rows are counted: 429 if ``tenant`` could not be admitted whatever its rows."""
        state = self._tenant(tenant)
        if state.limits is UNLIMITED:
            return
        state.refill(self.clock())
        self._refuse_if_over(tenant, state, 1, field)  # at least one row will come

    def admit(self, tenant: str, rows: int, field: str) -> TenantState:
        """Take ``rows`` from ``tenant``'s quota (429 if over); what it returns is handed to
        ``release`` once they are answered (and carries the tenant's weight meanwhile)."""
        state = self._tenant(tenant)
        if state.limits is not UNLIMITED:
            state.refill(self.clock())
            self._refuse_if_over(tenant, state, rows, field)
            state.tokens -= rows
        state.inflight += rows
        return state

    @staticmethod
    def release(admitted: TenantState, rows: int) -> None:
        admitted.inflight -= rows  # never forgotten meanwhile: only tenants with nothing in flight are

    def _shares(self, per_worker: float) -> str:
        return "" if self.workers == 1 else f" ({per_worker:,.0f} in each of {self.workers} workers)"

    def _refuse_if_over(self, tenant: str, state: TenantState, rows: int, field: str) -> None:
        limits = state.limits
        if limits.rows_per_second is not None and state.tokens <= 0:
            wait = max(1, math.ceil(-state.tokens / limits.rows_per_second + 1e-9))
            raise over_quota(
                f"tenant {tenant!r} is over its quota of {limits.rows_per_second * self.workers:,.0f} rows/s"
                f"{self._shares(limits.rows_per_second)}; retry in {wait} s",
                field,
                wait,
            )
        cap = limits.max_inflight_rows
        if cap is not None and state.inflight > 0 and state.inflight + rows > cap:
            raise over_quota(
                f"tenant {tenant!r} has {state.inflight:,} rows in flight; its max_inflight_rows is "
                f"{cap * self.workers:,}{self._shares(cap)}",
                field,
                1,
            )


def over_quota(message: str, field: str, retry_after: int) -> HTTPError:
    return HTTPError(429, message, field, [(b"retry-after", str(retry_after).encode())])
