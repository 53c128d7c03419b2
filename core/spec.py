"""The deployment file: references, predictors and routes as one reviewable TOML.

[[predictors]]
name = "fraud-v1"            # routes refer to predictors by name
version = "1"                # reported in every response
intent = "fraud"             # its scores map onto references/<intent>.toml
models = ["fraud/1"]         # NAME/VERSION; several = an ensemble
combine = "mean_logit"       # ensembles: "mean_logit" or "mean_probability"
calibration = "fraud/1"      # NAME/VERSION; omit to serve corrected scores unmapped

[[routes]]
tenant = "*"                 # "*" = the intent's default for every tenant
intent = "fraud"
active = "fraud-v1"
shadows = []

[batching."fraud/1"]         # optional, per model; these are the defaults
max_rows = 256
max_wait_us = 0
max_queue_rows = 16384
inline_max_us = 2000
max_call_us = 1000           # fewer rows a call when max_rows would take longer (0: no bound)

[[quotas]]                   # optional; a tenant without an entry (and no "*") is unlimited
tenant = "*"                 # the default for every tenant without its own entry
rows_per_second = 20000      # token bucket over scored rows (events), all intents
burst_rows = 40000           # default: 2 s of rows_per_second
max_inflight_rows = 8192     # rows of this tenant admitted and not yet answered
priority = "normal"          # "high" | "normal" | "low": its share when the model is busy

[[quotas]]
tenant = "acme-bank"         # what it leaves out comes from "*"
rows_per_second = 5000

[[refresh]]                  # optional; run by `muse refresher` (muse.core.refresh)
predictor = "fraud-v1"       # refit this predictor's map from its own score-log rows
every = "1d"                 # when its calibration is this old (a duration: 90s, 15m, 2h, 7d)
window = "7d"                # from the rows of this last stretch of time; or last = 200000 rows
tolerance = 0.10             # or sooner, when live alert rates drift this far off their targets
by = "tenant"                # also one map per tenant (optional)
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Literal

import msgspec

from muse.calib.names import (
    DEFAULT_TENANT,
    TENANT_RULE,
    LimitError,
    Name,
    NameRef,
    parse_document,
    route_tenant_problem,
)

ModelRef = NameRef  # NAME/VERSION of a model or calibration, each part a Name


class PredictorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    version: Name
    intent: Name
    models: Annotated[list[ModelRef], msgspec.Meta(min_length=1)]
    calibration: ModelRef | None = None
    combine: Literal["mean_logit", "mean_probability"] = "mean_logit"


class RouteSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    tenant: str  # a tenant name (muse.calib.names.check_tenant) or DEFAULT_TENANT
    intent: Name
    active: Name
    shadows: list[Name] = []

    def __post_init__(self) -> None:
        problem = route_tenant_problem(self.tenant)
        if problem is not None:  # decoding reports it at the route's path, `$.routes[i]`
            raise ValueError(
                f"tenant {self.tenant!r} is not a tenant name ({problem}); "
                f"use {TENANT_RULE}, or {DEFAULT_TENANT!r} for the intent's default route"
            )


class BatchingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    max_rows: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256  # rows per native call
    max_wait_us: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0  # linger for a fuller batch
    max_queue_rows: Annotated[int, msgspec.Meta(ge=1)] = 16384  # beyond this: 503, not a longer queue
    inline_max_us: Annotated[int, msgspec.Meta(ge=0)] = 2000  # at light load, calls cheaper than this run on the loop
    # fewer rows a call when the model's recent calls say max_rows would take longer (0: no bound)
    max_call_us: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000


Priority = Literal["high", "normal", "low"]
PRIORITY_WEIGHTS: dict[str, int] = {"high": 4, "normal": 2, "low": 1}  # rows drawn per round when busy


class QuotaSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    tenant: str  # a tenant name or DEFAULT_TENANT
    rows_per_second: Annotated[float, msgspec.Meta(gt=0)] | None = None
    burst_rows: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_inflight_rows: Annotated[int, msgspec.Meta(ge=1)] | None = None
    priority: Priority | None = None

    def __post_init__(self) -> None:
        problem = route_tenant_problem(self.tenant)
        if problem is not None:
            raise ValueError(f"tenant {self.tenant!r} is not a tenant name ({problem}); use {TENANT_RULE} or '*'")
        if self.burst_rows is not None and self.rows_per_second is None:
            raise ValueError("burst_rows needs rows_per_second (the rate that refills the burst)")


DURATION = re.compile(r"([1-9][0-9]{0,8})([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_FORMS = "a whole number and one of s, m, h, d: 90s, 15m, 2h, 7d"
MAX_DURATION_DAYS = 36_500
DurationText = Annotated[str, msgspec.Meta(pattern=f"^{DURATION.pattern}$", description=DURATION_FORMS)]


def parse_duration(what: str, text: str) -> datetime.timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``; anything else is a ValueError naming ``what``."""
    match = DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{what} {text!r}: not a duration; use {DURATION_FORMS}")
    seconds = int(match.group(1)) * UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:  # beyond it, dates it is subtracted from overflow
        raise ValueError(f"{what} {text!r}: longer than {MAX_DURATION_DAYS} days; use a shorter duration")
    return datetime.timedelta(seconds=seconds)


DEFAULT_REFRESH_WINDOW = "7d"
DEFAULT_REFRESH_MIN_SAMPLES = 10_000


class RefreshSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """When and how `muse refresher` refits a predictor's map (muse.core.refresh has the checks)."""

    predictor: Name
    every: DurationText  # refresh when the predictor's calibration is this old
    window: DurationText | None = None  # fit from the rows of this last stretch of time (default 7d)...
    last: Annotated[int, msgspec.Meta(ge=1)] | None = None  # ...or from this many newest rows
    # Refresh early when an edge's live alert rate is off its target by more than this fraction
    # of the target; also the bound a new map must keep on the newest rows of its window.
    tolerance: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.10
    # At most this change, as a fraction of the target, in any edge's alert rate at one refresh.
    max_shift: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    min_samples: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_REFRESH_MIN_SAMPLES
    by: Literal["tenant"] | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.last is not None:
            raise ValueError("give window (a duration) or last (a number of rows), not both")
        parse_duration("every", self.every)
        if self.window is not None:
            parse_duration("window", self.window)

    @property
    def window_text(self) -> str | None:
        """The time window, unless the policy counts rows (``last``)."""
        return None if self.last is not None else self.window or DEFAULT_REFRESH_WINDOW


class DeploymentSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    # Never empty: publishing a deployment without routes would take every tenant offline.
    predictors: Annotated[list[PredictorSpec], msgspec.Meta(min_length=1)]
    routes: Annotated[list[RouteSpec], msgspec.Meta(min_length=1)]
    batching: dict[ModelRef, BatchingSpec] = {}
    quotas: list[QuotaSpec] = []
    refresh: list[RefreshSpec] = []
    description: str = ""

    def predictor(self, name: str) -> PredictorSpec | None:
        """The predictor defined under ``name``, if any."""
        return next((p for p in self.predictors if p.name == name), None)

    def __post_init__(self) -> None:
        defined = {p.name for p in self.predictors}
        seen: set[str] = set()
        for i, policy in enumerate(self.refresh):
            if policy.predictor not in defined:
                raise ValueError(
                    f"refresh[{i}]: predictor {policy.predictor!r} is not defined "
                    f"(defined: {', '.join(sorted(defined))})"
                )
            if policy.predictor in seen:
                raise ValueError(f"refresh[{i}]: predictor {policy.predictor!r} has two refresh policies; keep one")
            seen.add(policy.predictor)


class SpecError(ValueError):
    """A deployment that must not be served; the message names the entry."""


def decode_spec(raw: bytes, source: str) -> DeploymentSpec:
    """A deployment from TOML (JSON when ``source`` ends in .json), within the document limits
    of muse.calib.names; SpecError naming ``source`` and the entry otherwise."""
    try:
        return msgspec.convert(parse_document(raw, source, toml=not source.endswith(".json")), DeploymentSpec)
    except LimitError as exc:
        raise SpecError(str(exc)) from None
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"{source}: not valid TOML/JSON ({exc})") from None


def encode_spec(spec: DeploymentSpec) -> bytes:
    return msgspec.toml.encode(spec)
