"""`muse calib refresh` (one refresh, now) and `muse refresher` (the deployment's [[refresh]]
policies, whenever due).  The work is muse.core.refresh; this is its command line."""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import pathlib
import signal
import threading
import time

import msgspec

from muse.calib.samples import is_url
from muse.core.deploy import DeploymentStore
from muse.core.locks import refresh_lock
from muse.core.refresh import RefreshError, RefreshOutcome, due, refresh
from muse.core.registry import Registry
from muse.core.spec import DEFAULT_REFRESH_MIN_SAMPLES, RefreshSpec, SpecError, parse_duration

from . import logs
from .cli_args import add_registry, add_score_log

log = logging.getLogger("muse.refresher")

POLL_SECONDS = 30.0
# After a refused refresh, the refresher tries that predictor again no sooner than this (or its
# `every`, if shorter): its audit trail gets one record per attempt, not one per poll.
RETRY_REFUSED_SECONDS = 900.0
EXIT_REFUSED = 1


def register_refresh(csub) -> None:
    """`muse calib refresh`, under `muse calib`."""
    p = csub.add_parser(
        "refresh",
        help="refit a deployed predictor's map from its own recent score-log rows, check it and publish it",
        description="Refit predictor P's quantile map from its own rows in the score log (active and shadow, "
        "its deployed version), check the new map (guardrails: --min-samples; every edge within --tolerance "
        "of its target on the newest rows of the window; no edge's alert rate moving more than --max-shift of "
        "its target at once), then publish a calibration version and a deployment generation that switches P "
        "to it, and append an audit record under REGISTRY/audit/. Defaults come from P's [[refresh]] policy "
        "in the current deployment, if it has one. Exit status 1 when the guardrails refuse the new map.",
    )
    add_registry(p)
    p.add_argument("--predictor", required=True, help="a predictor of the current deployment")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--since", metavar="DURATION", help="fit from rows this recent: 90s, 15m, 2h, 7d (default 7d)")
    window.add_argument("--last", type=int, metavar="N", help="fit from the predictor's N newest rows")
    p.add_argument("--by", choices=["tenant"], help="also one map per tenant")
    p.add_argument("--min-samples", type=int, help=f"fewest rows per map (default {DEFAULT_REFRESH_MIN_SAMPLES})")
    p.add_argument("--tolerance", type=float, help="largest |alert rate - target| / target on the newest rows")
    p.add_argument("--max-shift", type=float, help="largest change of an edge's alert rate, / target, at once")
    add_score_log(p)
    p.add_argument("--dry-run", action="store_true", help="fit and check, print, publish nothing")
    p.set_defaults(func=cmd_refresh)


def register(sub) -> None:
    """`muse refresher`."""
    p = sub.add_parser(
        "refresher",
        help="run the deployment's [[refresh]] policies: refit maps when due or when live alert rates drift",
        description="A long-running process (one per registry; a second one waits on the registry's refresh "
        "lock, so it takes over if the first dies). Every --poll seconds it reads the current deployment and, "
        "for each [[refresh]] policy, refreshes the predictor's map (as `muse calib refresh` does) when its "
        "calibration is older than `every`, or when the alert rates of the rows served by the current "
        "generation are off their targets by more than `tolerance`. Serving processes never fit maps.",
    )
    add_registry(p)
    add_score_log(p)
    p.add_argument(
        "--poll", type=float, default=POLL_SECONDS, help=f"seconds between checks (default {POLL_SECONDS:g})"
    )
    p.add_argument("--once", action="store_true", help="one pass over the policies, then exit (for cron)")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text")
    p.set_defaults(func=cmd_refresher)


def _policy(reg: Registry, args: argparse.Namespace) -> RefreshSpec:
    """P's declared policy (if any) with the flags given on top; validated as the spec is."""
    store = DeploymentStore(reg)
    generation = store.current_generation()
    declared: dict = {"predictor": args.predictor, "every": "1d"}
    if generation is not None:
        for policy in store.read(generation).refresh:
            if policy.predictor == args.predictor:
                declared = msgspec.to_builtins(policy)
    if args.since is not None:
        parse_duration("--since", args.since)
        declared.update(window=args.since, last=None)
    if args.last is not None:
        declared.update(last=args.last, window=None)
    for key in ("by", "min_samples", "tolerance", "max_shift"):
        if getattr(args, key) is not None:
            declared[key] = getattr(args, key)
    try:
        return msgspec.convert({k: v for k, v in declared.items() if v is not None}, RefreshSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(
            f"muse calib refresh: {exc} (from the flags and predictor {args.predictor}'s [[refresh]])"
        ) from None


def print_outcome(out: RefreshOutcome) -> None:
    plan = out.plan
    window = f"{plan.start} .. {plan.end}" if plan.start else "no rows"
    print(f"predictor {plan.predictor}: {plan.rows} rows in the window ({window})")
    print(f"  {'map':<16} {'rows':>8} {'newest':>7}  edge: alert rate now -> new map [target]  outcome")
    for record in out.maps:
        name = record.tenant or "(all traffic)"
        rates = "  ".join(f"{e.edge:g}: {e.before:.3f}->{e.after:.3f} [{e.target:g}]" for e in record.edges)
        print(f"  {name:<16} {record.rows:>8} {record.newest_rows:>7}  {rates or '-'}  {record.outcome}")
        for problem in record.problems:
            print(f"      {problem}")
    if plan.small_tenants:
        print(f"  {plan.small_tenants} more tenants: fewer rows than min_samples, they use the all-traffic map")
    if out.outcome == "published":
        print(f"published calibration {out.calibration} and generation {out.generation}; audit: {out.audit}")
    elif out.outcome == "dry run":
        print("dry run: nothing published" + ("" if plan.ok else " (the guardrails would refuse it)"))
    else:
        print(f"refused: nothing published; audit: {out.audit}")


def _scores_dir(flag: str | None) -> pathlib.Path | str | None:
    if flag is None or is_url(flag):
        return flag
    if not pathlib.Path(flag).is_dir():
        raise ValueError(f"--scores {flag}: no such directory (the score log: REGISTRY/scorelog by default)")
    return pathlib.Path(flag)


def cmd_refresh(args: argparse.Namespace) -> int:
    reg = Registry(args.registry)
    if not reg.root.is_dir():
        raise ValueError(f"--registry {args.registry}: no such directory")
    policy = _policy(reg, args)
    scores = _scores_dir(args.scores)
    with refresh_lock(reg, wait=60.0):
        out = refresh(reg, args.predictor, policy, scores=scores, dry_run=args.dry_run)
    print_outcome(out)
    return 0 if out.plan.ok else EXIT_REFUSED


class Refresher:
    """One pass over the current deployment's policies at a time (``run_once``).  Two refreshers
    on one registry take turns under its lock, each judging due-ness there, so a refresh one of
    them published is not due for the other."""

    def __init__(self, reg: Registry, scores: pathlib.Path | str | None, stop: threading.Event | None = None):
        self.reg, self.scores, self.stop = reg, scores, stop or threading.Event()
        self.store = DeploymentStore(reg)
        self._failed_at: dict[str, float] = {}  # predictor -> monotonic time of its last refused or failed attempt
        self._idle_said = False

    @property
    def failing(self) -> list[str]:
        """The predictors whose last attempt was refused or failed."""
        return sorted(self._failed_at)

    def run_once(self) -> list[RefreshOutcome]:
        """The refreshes done (published or refused); a predictor whose attempt failed or was
        refused is tried again after RETRY_REFUSED_SECONDS (or its `every`, if shorter)."""
        done: list[RefreshOutcome] = []
        if self.reg.mirror is not None:  # a registry on object storage: start from what it holds now
            self.reg.mirror.pull()
        try:
            self._run_policies(done)
        finally:
            if self.reg.mirror is not None:
                self.reg.mirror.push()  # audit records (publishing pushed the rest)
        return done

    def _run_policies(self, done: list[RefreshOutcome]) -> None:
        with refresh_lock(self.reg, stop=self.stop):
            generation = self.store.current_generation()
            if generation is None:
                if not self._idle_said:
                    log.info("nothing is deployed in %s yet: nothing to refresh", self.reg.root)
                    self._idle_said = True
                return
            for policy in self.store.read(generation).refresh:
                if self.stop.is_set():
                    break
                failed = self._failed_at.get(policy.predictor)
                backoff = min(RETRY_REFUSED_SECONDS, parse_duration("every", policy.every).total_seconds())
                if failed is not None and time.monotonic() - failed < backoff:
                    continue
                try:
                    out = self._run(policy)
                except (RefreshError, SpecError, OSError, ValueError) as exc:  # this policy's; the others go on
                    log.error("refresh of %s failed: %s", policy.predictor, exc)
                    self._failed_at[policy.predictor] = time.monotonic()
                    continue
                if out is None:
                    continue
                done.append(out)
                if out.outcome == "published":
                    self._failed_at.pop(policy.predictor, None)
                    log.info(
                        "published calibration %s for %s in generation %s (%d rows)",
                        out.calibration,
                        policy.predictor,
                        out.generation,
                        out.plan.rows,
                    )
                else:
                    self._failed_at[policy.predictor] = time.monotonic()
                    problems = [p for m in out.maps for p in m.problems]
                    log.warning(
                        "refresh of %s refused: %s (audit %s)", policy.predictor, "; ".join(problems), out.audit
                    )

    def _run(self, policy: RefreshSpec) -> RefreshOutcome | None:
        """Refresh ``policy``'s predictor if due, judged against the current generation."""
        generation = self.store.current_generation()
        if generation is None:
            return None
        predictor = self.store.read(generation).predictor(policy.predictor)
        if predictor is None:  # a generation published meanwhile dropped it
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        why = due(self.reg, policy, predictor, generation, now, self.scores)
        if why is None:
            return None
        log.info("refreshing %s (%s)", policy.predictor, why)
        return refresh(self.reg, policy.predictor, policy, scores=self.scores, now=now, trigger=why.split(":")[0])


def cmd_refresher(args: argparse.Namespace) -> int:
    """Exit status 0; with --once, 1 when a refresh was refused or failed (for cron)."""
    logs.configure(args.log_format)
    reg = Registry(args.registry)
    if not reg.root.is_dir():
        raise ValueError(f"--registry {args.registry}: no such directory")
    if not (math.isfinite(args.poll) and args.poll > 0):
        raise ValueError(f"--poll {args.poll}: give a number of seconds > 0")
    stop = threading.Event()
    refresher = Refresher(reg, _scores_dir(args.scores), stop)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("refresher on %s: %s", reg.root, "one pass" if args.once else f"checking every {args.poll:g} s")
    status = 0
    while not stop.is_set():
        try:
            refresher.run_once()
            status = 1 if refresher.failing else 0
        except InterruptedError:  # SIGTERM while waiting for the lock
            break
        except (SpecError, OSError, ValueError) as exc:  # a bad deployment: try again later
            log.error("refresher: %s", exc)
            status = 1
        if args.once or stop.wait(args.poll):
            break
    log.info("refresher stopped")
    return status if args.once else 0
