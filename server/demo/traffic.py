"""A deterministic generator of fraud-like card events, by month and tenant.

The data of `muse demo` (no public fraud data set can be downloaded here).
It is built to have what makes fraud scoring hard:

* ~1% positives, varying by tenant;
* numeric and categorical features (merchant category as an integer code),
  heavy-tailed amounts, and missing values (NaN) in the device and email
  features, more often for some tenants;
* covariate drift: amounts inflate and the share of online traffic grows
  month by month;
* attack patterns that move: early months' fraud is "large amount on a new
  device"; from month 4 on it shifts toward "bursts of small online payments
  from risky email domains", so a model trained on early months goes stale.

Everything is a pure function of (seed, month, tenant): the same call always
returns the same events."""

from __future__ import annotations

import zlib

import numpy as np

FEATURES = [
    "amount_log",
    "hour",
    "merchant_category",
    "is_online",
    "new_device",
    "account_age_days",
    "tx_count_24h",
    "distance_km_log",
    "email_risk",
    "country_risk",
    "card_present",
    "amount_vs_avg",
]

# tenant -> (online share, fraud-rate multiplier, missing-rate, amount scale)
TENANTS = {
    "acme-bank": (0.35, 1.0, 0.02, 1.0),
    "globex-pay": (0.70, 1.6, 0.06, 0.6),
    "initech-cu": (0.20, 0.6, 0.01, 1.5),
}


def _rng(seed: int, month: int, tenant: str) -> np.random.Generator:
    return np.random.default_rng([seed, month, zlib.crc32(tenant.encode())])


def _attack_weight(month: int) -> float:
    """0 = all early-pattern fraud, 1 = all late-pattern fraud."""
    return float(np.clip((month - 3) / 4, 0.0, 1.0))


def generate(month: int, rows: int, tenant: str = "acme-bank", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Events of one tenant in one month: features [rows, 12] (NaN = missing) and labels."""
    if tenant not in TENANTS:
        raise ValueError(f"unknown tenant {tenant!r}; simulated tenants: {', '.join(TENANTS)}")
    online_share, fraud_mult, missing, amount_scale = TENANTS[tenant]
    rng = _rng(seed, month, tenant)
    n = rows
    online = rng.random(n) < min(0.95, online_share + 0.03 * month)
    amount = rng.lognormal(3.2 + 0.03 * month, 1.1, n) * amount_scale
    hour = rng.integers(0, 24, n).astype(np.float64)
    mcc = rng.choice(20, n, p=np.linspace(2, 1, 20) / np.linspace(2, 1, 20).sum()).astype(np.float64)
    new_device = (rng.random(n) < np.where(online, 0.15, 0.03)).astype(np.float64)
    age = rng.exponential(900, n)
    tx24 = rng.poisson(np.where(online, 3.0, 1.5)).astype(np.float64)
    distance = rng.lognormal(2.0, 1.2, n)
    email_risk = rng.beta(1.2, 6, n)
    country_risk = rng.beta(1, 12, n)
    card_present = ((~online) & (rng.random(n) < 0.9)).astype(np.float64)
    avg = rng.lognormal(3.2, 0.8, n) * amount_scale
    X = np.column_stack(
        [
            np.log1p(amount),
            hour,
            mcc,
            online.astype(np.float64),
            new_device,
            age,
            tx24,
            np.log1p(distance),
            email_risk,
            country_risk,
            card_present,
            amount / avg,
        ]
    )
    w = _attack_weight(month)
    early = 1.4 * (np.log1p(amount) - 4.5) + 2.2 * new_device + 0.8 * (hour < 6) + 1.2 * (mcc == 7) - 0.0004 * age
    late = 1.8 * online + 0.45 * tx24 + 5.0 * email_risk + 4.0 * country_risk - 0.8 * (np.log1p(amount) - 3.0)
    logit = (1 - w) * early + w * late + 0.5 * np.log1p(distance) * (1 - card_present)
    base = np.log(0.01 * fraud_mult) - np.log(np.mean(np.exp(logit)))  # ~1% x tenant multiplier
    y = (rng.random(n) < 1 / (1 + np.exp(-(logit + base)))).astype(np.int32)
    # Missing values: device and email signals are often absent, more for some tenants.
    for col in (4, 8, 7):
        X[rng.random(n) < missing * (3 if col == 8 else 1), col] = np.nan
    return X, y


def generate_mix(month: int, rows_per_tenant: int, seed: int = 0, tenants=None):
    """All tenants' events for a month, concatenated, with a tenant label per row."""
    names = list(tenants or TENANTS)
    parts = [generate(month, rows_per_tenant, t, seed) for t in names]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    tenant = np.repeat(np.array(names), rows_per_tenant)
    return X, y, tenant


def undersample(X: np.ndarray, y: np.ndarray, beta: float, seed: int = 0):
    """Keep every positive and each negative with probability beta (what training pipelines do)."""
    keep = (y == 1) | (np.random.default_rng(seed).random(y.size) < beta)
    return X[keep], y[keep]
