"""Native predict benchmark: muse vs lightgbm.Booster.predict vs tl2cgen.Predictor.

One thread everywhere (LightGBM num_threads=1, TL2cgen nthread=1) so the
numbers compare code, not core counts.  Reports median ns per row.

    python -m muse.bench.kernel [--workdir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from muse.bench.models import fraud_like_matrix, train_lightgbm
from muse.bench.timing import median_seconds, print_table
from muse.compile import build_artifact, load_artifact

BATCHES = (1, 16, 256, 4096)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import lightgbm as lgb
    import tl2cgen
    import treelite

    cases = {
        "fraud 500x63": train_lightgbm(args.workdir / "fraud_500x63.txt", trees=500, leaves=63),
        "one tree": train_lightgbm(args.workdir / "one_tree.txt", trees=1, leaves=63),
    }
    X_all, _ = fraud_like_matrix(max(BATCHES), seed=7)
    rows = []
    for label, path in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            art = build_artifact(path, tmp, name="bench")
            compile_s = time.perf_counter() - t0
            muse_model = load_artifact(art)
            booster = lgb.Booster(model_file=str(path), params={"num_threads": 1})
            tl_lib = pathlib.Path(tmp) / "tl2cgen_stock.so"
            tl2cgen.export_lib(treelite.frontend.load_lightgbm_model(path), "gcc", tl_lib, params={}, nthread=2)
            tl_pred = tl2cgen.Predictor(tl_lib, nthread=1)
            print(f"{label}: muse compile {compile_s:.1f} s")
            for batch in BATCHES:
                X = np.ascontiguousarray(X_all[:batch])
                dmat = tl2cgen.DMatrix(X)
                np.testing.assert_allclose(muse_model.predict(X), booster.predict(X), atol=1e-9)
                t_muse = median_seconds(lambda: muse_model.predict(X), args.repeats)
                t_lgb = median_seconds(lambda: booster.predict(X, num_threads=1), args.repeats)
                t_tl = median_seconds(lambda: tl_pred.predict(dmat), args.repeats)
                ns = [t * 1e9 / batch for t in (t_muse, t_lgb, t_tl)]
                rows.append(
                    [
                        label,
                        batch,
                        f"{ns[0]:,.0f}",
                        f"{ns[1]:,.0f}",
                        f"{ns[2]:,.0f}",
                        f"{ns[1] / ns[0]:.1f}x",
                        f"{ns[2] / ns[0]:.1f}x",
                    ]
                )
    print()
    print_table(
        ["model", "batch", "muse ns/row", "lightgbm ns/row", "tl2cgen ns/row", "lightgbm/muse", "tl2cgen/muse"], rows
    )


if __name__ == "__main__":
    main()
