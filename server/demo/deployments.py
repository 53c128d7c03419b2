"""What the demo deploys, as Structs: each variant is the previous one with a change, and
is written as the TOML file that `muse deploy apply` reads, for the user to review."""

from __future__ import annotations

import pathlib

from msgspec.structs import replace

from muse.core.spec import DeploymentSpec, PredictorSpec, QuotaSpec, RefreshSpec, RouteSpec, encode_spec

FRAUD_V1 = PredictorSpec(name="fraud-v1", version="1", intent="fraud", models=["fraud/1"], calibration="fraud/1")
# The second intent shares v1's model: the server loads it once for both predictors.
REVIEW_V1 = PredictorSpec(
    name="review-v1", version="1", intent="review", models=["fraud/1"], calibration="fraud-review/1"
)
FRAUD_V2 = PredictorSpec(name="fraud-v2", version="2", intent="fraud", models=["fraud/2"])  # no maps yet
FRAUD_ROUTE = RouteSpec(tenant="*", intent="fraud", active="fraud-v1")

V1 = DeploymentSpec(
    predictors=[FRAUD_V1, REVIEW_V1],
    routes=[FRAUD_ROUTE, RouteSpec(tenant="*", intent="review", active="review-v1")],
    description="demo: v1 serves both intents",
)
# v2 scores copies of live fraud rows; callers still get v1.
V2_SHADOW = replace(
    V1,
    predictors=[*V1.predictors, FRAUD_V2],
    routes=[replace(FRAUD_ROUTE, shadows=["fraud-v2"]), *V1.routes[1:]],
    description="demo: v2 shadows v1 on the fraud intent, unmapped",
)
# The same, once v2's maps are fitted from its shadow scores.
V2_CALIBRATED_SHADOW = replace(
    V2_SHADOW,
    predictors=[*V1.predictors, replace(FRAUD_V2, calibration="fraud/2")],
    description="demo: v2 shadows v1 on the fraud intent, with its fitted maps",
)

# What `muse promote fraud-v2` publishes from the above (its description aside): v2 is
# active on fraud and no longer a shadow; v1 still serves review.
PROMOTED = replace(
    V2_CALIBRATED_SHADOW,
    routes=[replace(FRAUD_ROUTE, active="fraud-v2"), *V1.routes[1:]],
    description="demo: v2 serves the fraud intent, v1 the review intent",
)
# The promoted deployment with one tenant on a quota.  globex-pay: the payment processor of
# the three, mostly online traffic (70%), the kind of tenant whose retries and backfills come
# as bursts; 1,000 rows/s is far below what the demo sends, so its burst is cut short, while
# the two banks, with no quota entry (and no "*" entry), stay unlimited.
QUOTA_TENANT = "globex-pay"
QUOTA = QuotaSpec(tenant=QUOTA_TENANT, rows_per_second=1000.0, burst_rows=1000)
QUOTAS = replace(
    PROMOTED,
    quotas=[QUOTA],
    description=f"demo: v2 serves fraud; {QUOTA_TENANT} limited to 1,000 rows/s (bursts of 1,000 rows)",
)

# Later: the quota lifted, and fraud-v2's maps kept fresh by `muse refresher` from its own score-log
# rows, per tenant; `last` (the newest rows) is set by the demo to one half-month of its traffic.
# min_samples is the demo's volume (the default, 10,000, suits a month of a real tenant).
REFRESH = RefreshSpec(predictor="fraud-v2", every="1d", tolerance=0.10, min_samples=2000, by="tenant")
REFRESHED = replace(
    PROMOTED,
    refresh=[REFRESH],
    description="demo: v2 serves fraud, its maps refreshed by muse refresher; quotas lifted",
)


def write(spec: DeploymentSpec, path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(encode_spec(spec))
    return path
