"""Rows on a split threshold take the branch the training library takes (issue 17).

For every internal node of each model, a row that reaches the node (each feature on its path
set to satisfy every test above it, the others random) is scored with the node's feature
exactly on its threshold, one float32 ulp and one float64 ulp either side, and missing, and
compared with the library's own predict.  XGBoost compares float32 features with float32
thresholds and adds its float32 leaves to its base margin tree by tree: MUSE's margins are
bit-identical to Booster.predict's and inplace_predict's.  LightGBM's are bit-identical too,
scikit-learn's within 1e-12 (it adds in a different order).

The XGBoost model's features lie where 8 significant digits do not identify a float32
([0.1, 0.125), [8, 10), [64, 100), [1000, 1024)): TL2cgen printed its quantization table with
8 digits, which moved rows on a few thresholds to the other branch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse.compile import build_artifact, frontends, load_artifact

FEATURES = 7
# Treelite's node types and comparison operators (treelite/enum/...).
_NUMERICAL = 1
_LT, _LE, _GT, _GE = 2, 3, 4, 5


def awkward_data(rows: int, seed: int, nan: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [
            rng.normal(size=rows),
            0.1 + 0.025 * rng.random(rows),  # 8 digits step 1e-8 here, float32 ulps 7.5e-9
            8 + 2 * rng.random(rows),  # step 1e-6, ulp 9.5e-7
            64 + 36 * rng.random(rows),  # step 1e-5, ulp 7.6e-6
            1000 + 24 * rng.random(rows),  # step 1e-4, ulp 6.1e-5
            np.round(rng.normal(size=rows) * 2),  # ties on integer thresholds
            rng.normal(size=rows) * 0.15,
        ]
    )
    z = X[:, 0] + 40 * (X[:, 1] - 0.1125) + (X[:, 2] - 9) + (X[:, 3] - 82) / 18 + (X[:, 4] - 1012) / 12
    y = (z + X[:, 5] * X[:, 6] * 3 + rng.normal(size=rows) > 0).astype(np.int32)
    if nan:
        X[rng.random(X.shape) < 0.05] = np.nan
    return X, y


# --- the models: each returns {"margin": [reference margin functions], "proba": ...} ------------


def _xgboost(rounds: int, suffix: str):
    def make(path):
        import xgboost as xgb

        X, y = awkward_data(800, seed=0)
        params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "seed": 1}
        booster = xgb.train(params, xgb.DMatrix(X, y), rounds)
        path = path.with_suffix(suffix)
        booster.save_model(str(path))
        return path, {
            "margin": [
                lambda Z: booster.predict(xgb.DMatrix(Z), output_margin=True),
                lambda Z: booster.inplace_predict(Z, predict_type="margin"),
            ],
            "proba": lambda Z: booster.predict(xgb.DMatrix(Z)),
        }

    return make


def _lightgbm(path):
    import lightgbm as lgb

    X, y = awkward_data(800, seed=0)
    params = {"objective": "binary", "num_leaves": 8, "min_data_in_leaf": 5, "verbose": -1, "seed": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=30)
    path = path.with_suffix(".txt")
    booster.save_model(str(path))
    return path, {
        "margin": [lambda Z: booster.predict(Z, raw_score=True)],
        "proba": lambda Z: booster.predict(Z),
    }


def _sklearn(kind: str):
    def make(path):
        from sklearn import ensemble

        nan = kind != "GradientBoostingClassifier"
        X, y = awkward_data(800, seed=0, nan=nan)
        extra = {"max_iter": 20} if kind.startswith("Hist") else {"n_estimators": 20, "max_depth": 3}
        est = getattr(ensemble, kind)(random_state=1, **extra).fit(X, y)
        path = path.with_suffix(".pkl")
        path.write_bytes(pickle.dumps(est))
        return path, {"margin": [est.decision_function], "proba": lambda Z: est.predict_proba(Z)[:, 1]}

    return make


MODELS = {
    # 40 trees (with MUSE_CODEGEN=ifelse: quantized thresholds, tree units, the blocked entry point).
    "xgboost": (_xgboost(40, ".json"), {"nan": True, "exact": True}),
    # 3 trees (with MUSE_CODEGEN=ifelse: no quantization and no units, TL2cgen's own predict()).
    "xgboost-small-ubj": (_xgboost(3, ".ubj"), {"nan": True, "exact": True}),
    "lightgbm": (_lightgbm, {"nan": True, "exact": True}),
    "sklearn-gb": (_sklearn("GradientBoostingClassifier"), {"nan": False, "exact": False}),
    "sklearn-hgb": (_sklearn("HistGradientBoostingClassifier"), {"nan": True, "exact": False}),
}


# Plain classes, not dataclasses: hypothesis prints a dataclass field by field (rows, models),
# but a plain object by its __repr__.
class Node:
    """An internal node, and a row that reaches it."""

    def __init__(self, tree: int, node: int, feature: int, threshold, base: np.ndarray):
        self.tree, self.node, self.feature, self.threshold, self.base = tree, node, feature, threshold, base

    def __repr__(self) -> str:
        return f"Node(tree {self.tree}, node {self.node}, feature {self.feature}, threshold {self.threshold!r})"


class Model:
    def __init__(self, kind: str, source, compiled, reference: dict, nan: bool, exact: bool):
        self.kind, self.source, self.compiled, self.reference = kind, source, compiled, reference
        self.nan = nan  # the library accepts missing values
        self.exact = exact  # margins bit-identical to the library's
        self.float32_inputs: bool = source.float32_inputs
        self.nodes: list[Node] = []
        self.unreachable = 0  # internal nodes no row reaches (an empty interval on their path)

    def __repr__(self) -> str:
        return f"Model({self.kind}, {len(self.nodes)} nodes)"


_models: dict[str, Model] = {}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory) -> Model:
    return get_model(request.param, tmp_path_factory)


def get_model(kind: str, tmp_path_factory) -> Model:
    if kind not in _models:
        make, opts = MODELS[kind]
        folder = tmp_path_factory.mktemp(f"threshold-{kind}")
        path, reference = make(folder / "model")
        artifact = build_artifact(path, folder / "registry", name=kind)
        m = Model(kind, frontends.load_source_model(path), load_artifact(artifact), reference, **opts)
        forced_nodes(m, np.random.default_rng(11))
        _models[kind] = m
    return _models[kind]


# --- rows that reach a node ------------------------------------------------------------------------


class Grid:
    """The values a library compares: float32 (XGBoost, scikit-learn's trees) or float64."""

    def __init__(self, float32: bool):
        self.t = np.float32 if float32 else np.float64

    def below(self, t):  # the largest value < t
        c = self.t(t)
        return c if c < t else np.nextafter(c, self.t(-np.inf))

    def at_or_below(self, t):
        c = self.t(t)
        return c if c <= t else np.nextafter(c, self.t(-np.inf))

    def above(self, t):  # the smallest value > t
        c = self.t(t)
        return c if c > t else np.nextafter(c, self.t(np.inf))

    def at_or_above(self, t):
        c = self.t(t)
        return c if c >= t else np.nextafter(c, self.t(np.inf))


def _test(op: int, x, t) -> bool:
    return {_LT: x < t, _LE: x <= t, _GT: x > t, _GE: x >= t}[op]


def forced_nodes(m: Model, rng: np.random.Generator) -> None:
    """Fill ``m.nodes``: for every numerical test node, a row that reaches it."""
    grid = Grid(m.float32_inputs)
    model = m.source.model
    X, _ = awkward_data(800, seed=0, nan=False)
    mean, std = X.mean(axis=0), X.std(axis=0)
    for ti in range(model.num_tree):
        tree = model.get_tree_accessor(ti)
        kind, left, right, feat, thr, op = (
            tree.get_field(f) for f in ("node_type", "cleft", "cright", "split_index", "threshold", "cmp")
        )
        assert set(kind[kind != 0]) <= {_NUMERICAL}, "these models have numerical splits only"
        parent = {}
        for n in np.flatnonzero(kind == _NUMERICAL):
            parent[int(left[n])] = (n, True)
            parent[int(right[n])] = (n, False)
        for n in np.flatnonzero(kind == _NUMERICAL):
            lo: dict[int, float] = {}
            hi: dict[int, float] = {}
            c = n
            while c in parent:
                p, test_true = parent[c]
                f, t, o = int(feat[p]), thr[p], int(op[p])
                if (o in (_LT, _LE)) == test_true:  # the value must be below (or at) t
                    bound = grid.below(t) if o in (_LT, _GE) else grid.at_or_below(t)
                    hi[f] = min(hi.get(f, np.inf), bound)
                else:
                    bound = grid.at_or_above(t) if o in (_LT, _GE) else grid.above(t)
                    lo[f] = max(lo.get(f, -np.inf), bound)
                c = p
            row = mean + std * rng.normal(size=FEATURES)
            possible = True
            for f in set(lo) | set(hi):
                a, b = lo.get(f, -np.inf), hi.get(f, np.inf)
                if a > b:
                    possible = False
                    break
                if np.isinf(a):
                    v = b - std[f] * abs(rng.normal())
                elif np.isinf(b):
                    v = a + std[f] * abs(rng.normal())
                else:
                    v = a + (b - a) * rng.random()
                row[f] = float(min(max(grid.t(v), a), b))
            if not possible:
                m.unreachable += 1
                continue
            row = np.array([float(grid.t(v)) for v in row])
            assert reaches(tree, row, n, grid), (m.kind, ti, n)
            m.nodes.append(Node(ti, int(n), int(feat[n]), thr[n], row))


def reaches(tree, row: np.ndarray, target: int, grid: Grid) -> bool:
    kind, left, right, feat, thr, op, default_left = (
        tree.get_field(f) for f in ("node_type", "cleft", "cright", "split_index", "threshold", "cmp", "default_left")
    )
    n = 0
    while kind[n] != 0:
        if n == target:
            return True
        x = grid.t(row[feat[n]])
        go_left = bool(default_left[n]) if np.isnan(x) else _test(int(op[n]), x, thr[n])
        n = int(left[n] if go_left else right[n])
    return n == target


PROBES = ("on", "f32-", "f32+", "f64-", "f64+", "missing")


def probe_value(threshold, probe: str) -> float:
    t64, t32 = float(threshold), np.float32(threshold)
    return {
        "on": t64,
        "f32-": float(np.nextafter(t32, np.float32(-np.inf))),
        "f32+": float(np.nextafter(t32, np.float32(np.inf))),
        "f64-": float(np.nextafter(t64, -np.inf)),
        "f64+": float(np.nextafter(t64, np.inf)),
        "missing": np.nan,
    }[probe]


def threshold_rows(m: Model) -> tuple[np.ndarray, list[tuple]]:
    rows, tags = [], []
    for node in m.nodes:
        for probe in PROBES:
            if probe == "missing" and not m.nan:
                continue
            row = node.base.copy()
            row[node.feature] = probe_value(node.threshold, probe)
            rows.append(row)
            tags.append((node.tree, node.node, probe, float(node.threshold)))
    return np.array(rows), tags


def check(m: Model, X: np.ndarray, tags: list | None = None) -> None:
    """MUSE's margins against every reference margin of the library: the same branch everywhere
    (1e-6), then bit-identical (XGBoost, LightGBM) or within 1e-12 (scikit-learn)."""
    got = m.compiled.predict(X, margin=True)
    for reference in m.reference["margin"]:
        want = np.asarray(reference(X), dtype=np.float64)
        diff = np.abs(got - want)
        bad = np.flatnonzero(~(diff <= 1e-6))
        detail = [(tags[i] if tags else X[i].tolist(), got[i], want[i]) for i in bad[:5]]
        assert not bad.size, f"{m.kind}: {bad.size} of {len(X)} rows take another branch: {detail}"
        if m.exact:
            bad = np.flatnonzero(got != want)
            detail = [(tags[i] if tags else X[i].tolist(), got[i], want[i]) for i in bad[:5]]
            assert not bad.size, f"{m.kind}: {bad.size} of {len(X)} margins are not bit-identical: {detail}"
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=m.kind)
    proba = m.compiled.predict(X, margin=False)
    np.testing.assert_allclose(proba, m.reference["proba"](X), rtol=0, atol=1e-6, err_msg=m.kind)


# --- tests --------------------------------------------------------------------------------------------


def test_every_node_reached(model):
    """The forced rows cover every internal node (no split in these models is unreachable)."""
    assert model.unreachable == 0
    assert len(model.nodes) >= (20 if model.kind != "xgboost-small-ubj" else 6)


def test_both_code_paths_covered(tmp_path_factory):
    """Both XGBoost models take the predicated generator (node arrays, its one-row walk for the
    small one's single rows and the blocked walk for batches), both starting at XGBoost's base
    margin; the if/else generator's two paths on the same models are checked in
    test_predicated_codegen.py."""
    big = get_model("xgboost", tmp_path_factory).compiled.manifest
    small = get_model("xgboost-small-ubj", tmp_path_factory).compiled.manifest
    for manifest in (big, small):
        assert manifest.codegen_params["predicated"] == 1 and "-DMUSE_PREDICATED" in manifest.compiler_flags
        assert any(flag.startswith("-DMUSE_BASE_MARGIN=") for flag in manifest.compiler_flags)


def test_xgboost_model_exercises_the_defect(tmp_path_factory):
    """Issue 17's trigger is in the model: thresholds that 8 significant digits do not identify."""
    m = get_model("xgboost", tmp_path_factory)
    thresholds = {np.float32(node.threshold) for node in m.nodes}
    missed = [t for t in thresholds if np.float32(float(f"{float(t):.8g}")) != t]
    assert len(missed) >= 5, missed


def test_rows_on_every_threshold(model):
    X, tags = threshold_rows(model)
    check(model, X, tags)


def test_ordinary_rows(model):
    X, _ = awkward_data(1000, seed=21, nan=model.nan)
    check(model, X)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_rows_near_thresholds_hypothesis(model, data):
    """Rows a few ulps (float32 or float64) from one or more thresholds at once."""
    nodes = data.draw(st.lists(st.sampled_from(model.nodes), min_size=1, max_size=8))
    rows = []
    for node in nodes:
        row = node.base.copy()
        for other in [*data.draw(st.lists(st.sampled_from(model.nodes), max_size=3)), node]:
            steps = data.draw(st.integers(-3, 3))
            dtype = data.draw(st.sampled_from([np.float32, np.float64]))
            v = dtype(other.threshold)
            for _ in range(abs(steps)):
                v = np.nextafter(v, dtype(np.inf if steps > 0 else -np.inf))
            row[other.feature] = float(v)
        rows.append(row)
    check(model, np.array(rows))


def test_xgboost_base_margin_is_xgboosts(tmp_path):
    """XGBoost turns base_score into a margin in float32 (-logf(1/p - 1), p clamped to
    [1e-6, 1 - 1e-6]); Treelite in float64.  MUSE starts from XGBoost's value."""
    import treelite
    import xgboost as xgb

    X = np.zeros((1, 3))
    for i, p in enumerate([0.32, 0.5, 1e-7, 1 - 1e-7, 1e-3, *np.random.default_rng(4).random(25)]):
        booster = xgb.train({"objective": "binary:logistic", "base_score": float(p)}, xgb.DMatrix(X, [1]), 0)
        path = tmp_path / f"base{i}.json"
        booster.save_model(str(path))
        header = treelite.frontend.load_xgboost_model(path).get_header_accessor()
        want = booster.predict(xgb.DMatrix(X), output_margin=True)[0]
        assert np.float32(frontends.xgboost_base_margin(float(header.get_field("base_scores")[0]))) == want, p


@pytest.mark.parametrize("base_score", [1e-7, 1 - 1e-8])
def test_xgboost_models_with_a_clamped_base_score_compile_exact(tmp_path, base_score):
    """Beyond [1e-6, 1 - 1e-6] XGBoost clamps base_score and Treelite does not (1 - 1e-8 is 1.0 in
    float32: an infinite logit); the compile-time check against GTIL starts from XGBoost's margin."""
    import xgboost as xgb

    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 4))
    booster = xgb.train(
        {"objective": "binary:logistic", "base_score": base_score, "max_depth": 3},
        xgb.DMatrix(X, (X[:, 0] > 0).astype(int)),
        10,
    )
    booster.save_model(str(tmp_path / "m.json"))
    model = load_artifact(build_artifact(tmp_path / "m.json", tmp_path / "models", name="m", version="1"))
    want = booster.predict(xgb.DMatrix(X), output_margin=True)
    assert np.array_equal(model.predict(X, margin=True), want.astype(np.float64))


def test_xgboost_with_many_trees_and_a_base_score_far_from_half_builds_exact(tmp_path):
    """The build probe's reference adds the trees in float32 from XGBoost's base margin, as XGBoost
    does: summed from 0 with the base added last, 1,000 trees at base_score 0.3 fell outside the
    probe's tolerance and a correct library was refused."""
    import xgboost as xgb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 20))
    X[rng.random(X.shape) < 0.05] = np.nan
    y = ((np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 3]) + rng.normal(size=3000)) > 0).astype(int)
    params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.02, "base_score": 0.3, "seed": 1}
    booster = xgb.train(params, xgb.DMatrix(X, y), 1000)
    booster.save_model(str(tmp_path / "many.json"))
    model = load_artifact(build_artifact(tmp_path / "many.json", tmp_path / "out", name="many"))
    Z = X[:300]
    want = booster.predict(xgb.DMatrix(Z), output_margin=True)
    np.testing.assert_array_equal(model.predict(Z, margin=True), want.astype(np.float64))
