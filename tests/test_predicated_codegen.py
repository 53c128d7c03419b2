"""The two code generators: the predicated walk over node arrays (LightGBM, XGBoost) and the
if/else fallback (TL2cgen), each exact on rows forced onto every threshold."""

from __future__ import annotations

import numpy as np
import pytest
from test_threshold_parity import MODELS, Model, check, forced_nodes, threshold_rows

from muse.bench.models import fraud_like_matrix
from muse.compile import build_artifact, codegen, load_artifact
from muse.compile.frontends import load_source_model

_LT, _LE, _GT, _GE = 2, 3, 4, 5


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_every_split_is_one_greater_than(dt):
    """`x op t` for every x of the type but NaN is `column > a`, column x, -x or 0: on the
    threshold, ulps either side, and the infinities."""
    rng = np.random.default_rng(0)
    thresholds = [0.0, -0.0, np.inf, -np.inf, 1e-35, -1e-35, 1e300, -1e300, 3.4e38, 5e-324]
    thresholds += list(rng.normal(size=40)) + list(rng.normal(size=20).astype(np.float32).astype(float))
    for t in map(np.float64, thresholds):  # not Python floats: NumPy compares those as the array's type
        with np.errstate(over="ignore"):
            c = dt(t)
        up, down = np.nextafter(c, dt(np.inf)), np.nextafter(c, dt(-np.inf))
        near = [c, up, down, np.nextafter(up, dt(np.inf)), np.nextafter(down, dt(-np.inf)), np.inf, -np.inf, 0, -0.0]
        xs = np.array(near, dtype=dt)
        for op in (_LT, _LE, _GT, _GE):
            kind, a = codegen._greater_form(op, t, dt)
            column = {codegen._X: xs, codegen._NEG_X: -xs, codegen._NOT_NAN: np.zeros_like(xs)}[kind]
            want = {_LT: xs < t, _LE: xs <= t, _GT: xs > t, _GE: xs >= t}[op]
            assert np.array_equal(column > a, want), (t, op, xs, kind, a)


# --- the if/else fallback on the threshold models --------------------------------------------------

_fallback: dict[str, Model] = {}


def fallback_model(kind: str, tmp_path_factory, monkeypatch) -> Model:
    if kind not in _fallback:
        make, opts = MODELS[kind]
        folder = tmp_path_factory.mktemp(f"ifelse-{kind}")
        path, reference = make(folder / "model")
        monkeypatch.setenv("MUSE_CODEGEN", "ifelse")
        artifact = build_artifact(path, folder / "registry", name=kind)
        m = Model(kind, load_source_model(path), load_artifact(artifact), reference, **opts)
        forced_nodes(m, np.random.default_rng(11))
        _fallback[kind] = m
    return _fallback[kind]


@pytest.mark.parametrize("kind", ["xgboost", "xgboost-small-ubj", "lightgbm"])
def test_ifelse_generator_on_every_threshold(kind, tmp_path_factory, monkeypatch):
    m = fallback_model(kind, tmp_path_factory, monkeypatch)
    assert "-DMUSE_PREDICATED" not in m.compiled.manifest.compiler_flags
    X, tags = threshold_rows(m)
    check(m, X, tags)


def test_ifelse_generator_paths(tmp_path_factory, monkeypatch):
    """Forced to the if/else generator, the two XGBoost models take both of its paths: quantized
    thresholds in tree units over blocks of rows, and plain thresholds in TL2cgen's predict()."""
    big = fallback_model("xgboost", tmp_path_factory, monkeypatch).compiled.manifest
    small = fallback_model("xgboost-small-ubj", tmp_path_factory, monkeypatch).compiled.manifest
    assert big.codegen_params["quantize"] == 1 and "-DMUSE_BLOCKED" in big.compiler_flags
    assert small.codegen_params["quantize"] == 0 and "-DMUSE_BLOCKED" not in small.compiler_flags


def test_unknown_generator_is_refused(tmp_path, monkeypatch):
    import lightgbm as lgb

    X, y = fraud_like_matrix(300, features=10, seed=1)
    lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4}, lgb.Dataset(X, y), 2).save_model(
        str(tmp_path / "m.txt")
    )
    monkeypatch.setenv("MUSE_CODEGEN", "jit")
    with pytest.raises(codegen.ModelFormatError, match="unknown code generator 'jit'"):
        build_artifact(tmp_path / "m.txt", tmp_path / "registry", name="m")


def test_categorical_splits_fall_back(tmp_path):
    import lightgbm as lgb

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.integers(0, 30, 2000).astype(float), rng.normal(size=2000)])
    y = (np.isin(X[:, 0], [2, 7, 11]) | (rng.random(2000) < 0.1)).astype(int)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "max_cat_to_onehot": 4}
    lgb.train(params, lgb.Dataset(X, y, categorical_feature=[0]), 5).save_model(str(tmp_path / "cat.txt"))
    assert "cat_threshold" in (tmp_path / "cat.txt").read_text()
    manifest = load_artifact(build_artifact(tmp_path / "cat.txt", tmp_path / "registry", name="cat")).manifest
    assert "-DMUSE_PREDICATED" not in manifest.compiler_flags and "predicated" not in manifest.codegen_params


# --- the predicated walk on a deeper model -----------------------------------------------------------


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """60 leaf-wise trees of up to 31 leaves on fraud-shaped data (NaN, integer ties): unbalanced
    trees of many depths, and LightGBM's `x <= inf` splits (NaN against every number)."""
    import lightgbm as lgb

    X, y = fraud_like_matrix(4000, features=30, seed=2)
    rng = np.random.default_rng(2)
    missing = rng.random(len(X)) < 0.3  # missing, not the value, tells: splits NaN from every number
    X[missing, 29] = np.nan
    y = np.where(missing & (rng.random(len(X)) < 0.5), 1, y)
    params = {"objective": "binary", "num_leaves": 31, "min_data_in_leaf": 5, "verbose": -1, "seed": 0}
    path = tmp_path_factory.mktemp("deep") / "deep.txt"
    booster = lgb.train(params, lgb.Dataset(X, y), 60)
    booster.save_model(str(path))
    model = load_artifact(build_artifact(path, path.parent / "registry", name="deep"))
    return booster, load_source_model(path), model


def awkward_rows(source, rows: int, seed: int) -> np.ndarray:
    """Rows whose values sit on the model's thresholds, one float32 or float64 ulp either side,
    or are special (signed zeros, LightGBM's near-zeros, NaN, infinities, huge values)."""
    rng = np.random.default_rng(seed)
    model = source.model
    per_feature: list[list[float]] = [[] for _ in range(int(model.num_feature))]
    for i in range(int(model.num_tree)):
        tree = model.get_tree_accessor(i)
        for f, t, kind in zip(tree.get_field("split_index"), tree.get_field("threshold"), tree.get_field("node_type")):
            if kind == 1:
                per_feature[f].append(float(t))
    X = rng.normal(size=(rows, len(per_feature))) * 3
    for j, ths in enumerate(per_feature):
        if not ths:
            continue
        t = np.array(ths)[rng.integers(0, len(ths), rows)]
        t32 = t.astype(np.float32)
        with np.errstate(over="ignore"):
            near = [
                t,
                np.nextafter(t, np.inf),
                np.nextafter(t, -np.inf),
                t32.astype(float),
                np.nextafter(t32, np.float32(np.inf)).astype(float),
                np.nextafter(t32, np.float32(-np.inf)).astype(float),
            ]
        pick = np.stack(near)[rng.integers(0, len(near), rows), np.arange(rows)]
        X[:, j] = np.where(rng.random(rows) < 0.6, pick, X[:, j])
    special = np.array([0.0, -0.0, 1e-36, -1e-36, 1e-35, -1e-35, 5e-324, np.nan, np.inf, -np.inf, 3.4e38, 1e300])
    mask = rng.random(X.shape) < 0.1
    X[mask] = special[rng.integers(0, len(special), int(mask.sum()))]
    return X


def test_deep_model_uses_every_column_kind(deep):
    _, source, model = deep
    assert model.manifest.codegen_params == {"predicated": 1, "tree_group": codegen.TREE_GROUP}
    kinds = {
        codegen._greater_form(o, t, np.float32)[0] for f, o, t, _ in codegen.forest_layout(source.model)[0] if f >= 0
    }
    assert kinds == {codegen._X, codegen._NEG_X, codegen._NOT_NAN}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deep_model_bit_identical(deep, dtype):
    booster, source, model = deep
    with np.errstate(over="ignore"):  # 1e300 as float32: inf
        X = awkward_rows(source, 3000, seed=5).astype(dtype)
    np.testing.assert_array_equal(model.predict(X, margin=True), booster.predict(X, raw_score=True))
    np.testing.assert_array_equal(model.predict(X), booster.predict(X))


def test_deep_model_any_batch_size(deep):
    """The one-row walk (trees side by side), the blocked walk (rows side by side) and the rows
    left over from its groups of 8 give the same bits."""
    _, source, model = deep
    X = awkward_rows(source, 200, seed=6)
    whole = model.predict(X, margin=True)
    for size in (1, 7, 8, 9, 63, 64, 65, 130):
        parts = np.concatenate([model.predict(X[i : i + size], margin=True) for i in range(0, len(X), size)])
        assert parts.tobytes() == whole.tobytes(), size


def test_trees_far_deeper_than_paths_fall_back(deep, tmp_path, monkeypatch):
    """A walk takes a tree's full depth: where that is far more than the paths training rows took
    (here a limit below this model's ~2x), the if/else trees are built instead, and still exact."""
    booster, source, _ = deep
    depths = codegen.forest_layout(source.model)[3]
    waste = sum(depths) / codegen.expected_path_length(source.model)
    assert 1.2 < waste < codegen.WALK_WASTE_LIMIT
    monkeypatch.setattr(codegen, "WALK_WASTE_LIMIT", 1.2)
    model = load_artifact(build_artifact(source.path, tmp_path / "registry", name="deep"))
    assert "-DMUSE_PREDICATED" not in model.manifest.compiler_flags
    X = awkward_rows(source, 500, seed=7)
    np.testing.assert_array_equal(model.predict(X, margin=True), booster.predict(X, raw_score=True))
