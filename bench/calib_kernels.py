"""Correction + quantile-mapping throughput: muse's fused Numba kernel vs numpy.

Baselines in the same run: numpy.interp after a NumPy sigmoid (the obvious
way), and a pure-NumPy searchsorted + lerp.  Reports median ns per score
for correction plus mapping; muse writes into reused output buffers, as the
server does.

    python -m muse.bench.calib_kernels
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from muse.bench.timing import median_seconds, print_table
from muse.calib import AlertRateCurve, MapTable, fit_quantile_map

SIZES = (1, 64, 4096, 1_000_000)


def numpy_interp(margins, log_beta, qmap):
    p = 1.0 / (1.0 + np.exp(-(margins + log_beta)))
    return np.interp(p, qmap.xs, qmap.ys)


def numpy_searchsorted(margins, log_beta, qmap):
    p = 1.0 / (1.0 + np.exp(-(margins + log_beta)))
    xs, ys = qmap.xs, qmap.ys
    i = np.clip(np.searchsorted(xs, p, side="right") - 1, 0, xs.size - 2)
    t = np.clip((p - xs[i]) / (xs[i + 1] - xs[i]), 0.0, 1.0)
    return ys[i] + t * (ys[i + 1] - ys[i])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    reference = AlertRateCurve([0.2, 0.5, 0.6, 0.8], [0.70, 0.35, 0.10, 0.05])
    beta = 0.1
    fit_margins = rng.logistic(-3.0, 1.5, size=200_000)
    qmap = fit_quantile_map(1 / (1 + np.exp(-(fit_margins + math.log(beta)))), reference)
    # Eight maps (e.g. tenants) in one table; every row picks one at random.
    table = MapTable([qmap] + [fit_quantile_map(rng.beta(1, 5 + k, 50_000), reference) for k in range(7)])
    rows = []
    for n in SIZES:
        margins = rng.logistic(-3.0, 1.5, size=n)
        mixed = rng.integers(0, len(table), size=n)
        np.testing.assert_allclose(
            table.calibrate(margins, 0, beta, "logit")[1], numpy_interp(margins, math.log(beta), qmap), atol=1e-12
        )
        out = np.empty((2, n))  # preallocated, as a caller that reuses buffers would
        t_muse = median_seconds(lambda: table.calibrate(margins, 0, beta, "logit", out), args.repeats)
        t_mixed = median_seconds(lambda: table.calibrate(margins, mixed, beta, "logit", out), args.repeats)
        t_interp = median_seconds(lambda: numpy_interp(margins, math.log(beta), qmap), args.repeats)
        t_ss = median_seconds(lambda: numpy_searchsorted(margins, math.log(beta), qmap), args.repeats)
        ns = [t * 1e9 / n for t in (t_muse, t_mixed, t_interp, t_ss)]
        rows.append([f"{n:,}", f"{ns[0]:.1f}", f"{ns[1]:.1f}", f"{ns[2]:.1f}", f"{ns[3]:.1f}", f"{ns[2] / ns[0]:.1f}x"])
    print(f"map: {len(qmap)} knots; mixed: {len(table)} maps, random per row")
    print_table(["scores", "muse fused ns", "muse mixed ns", "np.interp ns", "np searchsorted ns", "interp/muse"], rows)


if __name__ == "__main__":
    main()
