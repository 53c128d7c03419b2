"""Every way a model file or an artifact can be wrong gives an error that names it."""

from __future__ import annotations

import json
import pickle
import shutil

import msgspec
import numpy as np
import pytest
from conftest import training_data

from muse.compile import ArtifactError, ModelFormatError, build_artifact, load_artifact
from muse.compile.manifest import read_manifest, sha256_file, write_manifest
from muse.server.cli import main as cli


def _lgb_file(path, objective="binary", **extra):
    import lightgbm as lgb

    X, y = training_data(rows=300, nan=False)
    if objective == "multiclass":
        y = (X[:, 1] > 0).astype(int) + (X[:, 2] > 0).astype(int)
        extra["num_class"] = 3
    params = {"objective": objective, "num_leaves": 4, "verbose": -1, **extra}
    lgb.train(params, lgb.Dataset(X, y), num_boost_round=3).save_model(str(path))
    return path


@pytest.fixture
def models(tmp_path):
    return tmp_path / "models"


def test_truncated_lightgbm(tmp_path, models):
    good = _lgb_file(tmp_path / "m.txt")
    text = good.read_text()
    bad = tmp_path / "cut.txt"
    bad.write_text(text[: text.index("end of trees") - 40])  # cut inside the trees
    with pytest.raises(ModelFormatError, match=r"cut.txt: LightGBM model is truncated"):
        build_artifact(bad, models, name="m")


def test_corrupt_lightgbm(tmp_path, models):
    good = _lgb_file(tmp_path / "m.txt")
    bad = tmp_path / "corrupt.txt"
    bad.write_text(good.read_text().replace("split_feature=", "split_feature=zz "))
    with pytest.raises(ModelFormatError, match=r"corrupt.txt: not a readable lightgbm model"):
        build_artifact(bad, models, name="m")


@pytest.mark.parametrize(
    "old, new",
    [("threshold=", "threshold=x "), ("decision_type=", "decision_type=2 "), ("Tree=0", "Tree=zero")],
)
def test_malformed_numbers_in_a_lightgbm_file_name_the_file(tmp_path, models, old, new):
    """A tree's numbers that are no numbers, or a threshold list longer than its decision types:
    a ModelFormatError naming the file, not a bare ValueError from the zero-as-missing check."""
    good = _lgb_file(tmp_path / "m.txt")
    bad = tmp_path / "malformed.txt"
    bad.write_text(good.read_text().replace(old, new, 1))
    with pytest.raises(ModelFormatError, match=r"malformed.txt: "):
        build_artifact(bad, models, name="m")


@pytest.mark.parametrize(
    "objective, words",
    [("multiclass", "multi-class model \\(3 classes\\)"), ("regression", "is not a binary classifier")],
)
def test_non_binary_lightgbm(tmp_path, models, objective, words):
    path = _lgb_file(tmp_path / f"{objective}.txt", objective)
    with pytest.raises(ModelFormatError, match=f"{objective}.txt: .*{words}"):
        build_artifact(path, models, name="m")


def test_xgboost_multiclass_and_truncated(tmp_path, models):
    import xgboost as xgb

    X, _ = training_data(rows=300, nan=False)
    y = (X[:, 1] > 0).astype(int) + (X[:, 2] > 0).astype(int)
    booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 2}, xgb.DMatrix(X, y), 2)
    path = tmp_path / "multi.json"
    booster.save_model(str(path))
    with pytest.raises(ModelFormatError, match=r"multi\.json: multi-class model"):
        build_artifact(path, models, name="m")
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[:500])
    with pytest.raises(ModelFormatError, match=r"cut\.json: XGBoost JSON is corrupt or truncated"):
        build_artifact(cut, models, name="m")


def test_unsupported_sklearn_estimator(tmp_path, models):
    from sklearn.linear_model import LogisticRegression

    X, y = training_data(rows=100, nan=False)
    path = tmp_path / "lr.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression().fit(X, y)))
    with pytest.raises(ModelFormatError, match=r"lr\.pkl: unsupported scikit-learn estimator LogisticRegression"):
        build_artifact(path, models, name="m")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFormatError, match=r"garbage\.pkl: not a readable pickle"):
        build_artifact(garbage, models, name="m")


def test_empty_and_unknown_files(tmp_path, models):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"empty\.txt: file is empty"):
        build_artifact(empty, models, name="m")
    prose = tmp_path / "notes.md"
    prose.write_text("hello")
    with pytest.raises(ModelFormatError, match=r"notes\.md: cannot tell the model format.*--format"):
        build_artifact(prose, models, name="m")
    with pytest.raises(ModelFormatError, match=r"missing\.txt: no such model file"):
        build_artifact(tmp_path / "missing.txt", models, name="m")


def test_versions_are_immutable_and_names_checked(tmp_path, models):
    path = _lgb_file(tmp_path / "m.txt")
    first = build_artifact(path, models, name="m")
    assert first.name == "1" and build_artifact(path, models, name="m").name == "2"
    with pytest.raises(FileExistsError, match="versions are immutable"):
        build_artifact(path, models, name="m", version="1")
    with pytest.raises(ValueError, match=r"model name '\.\./x'"):
        build_artifact(path, models, name="../x")
    with pytest.raises(ValueError, match="beta must be in"):
        build_artifact(path, models, name="m", beta=0)


@pytest.fixture
def artifact(tmp_path, models):
    return build_artifact(_lgb_file(tmp_path / "m.txt"), models, name="m")


def test_tampered_library_refused(artifact):
    lib = artifact / read_manifest(artifact).library_file
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"does not match the manifest.*recompile"):
        load_artifact(artifact)


def _replace_library(artifact, content_from):
    manifest = read_manifest(artifact)
    lib = artifact / manifest.library_file
    shutil.copy(content_from, lib)
    write_manifest(artifact, msgspec.structs.replace(manifest, library_sha256=sha256_file(lib)))
    return lib


def test_not_a_library_refused(artifact, tmp_path):
    fake = tmp_path / "fake.so"
    fake.write_text("not an ELF file")
    _replace_library(artifact, fake)
    with pytest.raises(ArtifactError, match="cannot load shared library"):
        load_artifact(artifact)


def test_foreign_library_refused(artifact):
    import importlib.util

    # A shared library every installation has that is not a model library: one of our own extensions.
    foreign = importlib.util.find_spec("muse.compile._library").origin
    _replace_library(artifact, foreign)
    with pytest.raises(ArtifactError, match="not a MUSE model library \\(missing symbol muse_abi_version\\)"):
        load_artifact(artifact)


def test_missing_pieces(artifact):
    (artifact / read_manifest(artifact).library_file).unlink()
    with pytest.raises(ArtifactError, match="library named in the manifest is missing"):
        load_artifact(artifact)
    (artifact / "manifest.json").write_text(json.dumps({"name": "m"}))
    with pytest.raises(ArtifactError, match="invalid manifest"):
        load_artifact(artifact)
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_artifact(artifact)


def test_cli_compile_reports_errors_and_success(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("tree\nversion=v4\n")
    assert cli(["compile", str(bad), "--registry", str(tmp_path / "reg"), "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert "muse compile: error:" in err and "bad.txt" in err and "Traceback" not in err
    good = _lgb_file(tmp_path / "m.txt")
    assert cli(["compile", str(good), "--registry", str(tmp_path / "reg"), "--name", "m", "--beta", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "compiled" in out and "beta 0.5" in out
    model = load_artifact(tmp_path / "reg" / "models" / "m" / "1")
    assert model.manifest.beta == 0.5 and model.predict(np.zeros((2, 6))).shape == (2,)


def test_lightgbm_zero_as_missing_nodes_treelite_misreads_are_refused(tmp_path):
    """With zero_as_missing=true LightGBM sends zeros and NaN to a node's default child; Treelite
    compares them with the threshold.  Where the two disagree, refuse rather than score wrong."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    X[rng.random(X.shape) < 0.3] = 0.0
    y = ((X[:, 0] + (X[:, 1] == 0) * 1.5 - (X[:, 2] == 0) + rng.normal(size=3000) * 0.5) > 0).astype(int)
    params = {"objective": "binary", "num_leaves": 8, "verbose": -1, "zero_as_missing": True, "seed": 0}
    lgb.train(params, lgb.Dataset(X, y), 20).save_model(str(tmp_path / "zero.txt"))
    with pytest.raises(
        ModelFormatError, match=r"trained with zero_as_missing=true, .* retrain with zero_as_missing=false"
    ):
        build_artifact(tmp_path / "zero.txt", tmp_path / "out", name="zero")


def test_lightgbm_sigmoid_other_than_1_is_refused(tmp_path):
    """LightGBM's probability is sigmoid(alpha x margin); correction and maps take alpha 1."""
    import lightgbm as lgb

    X, y = training_data(rows=400, seed=3)
    params = {"objective": "binary", "sigmoid": 2.5, "num_leaves": 7, "verbose": -1}
    lgb.train(params, lgb.Dataset(X, y), 5).save_model(str(tmp_path / "alpha.txt"))
    with pytest.raises(ModelFormatError, match=r"sigmoid\(2.5 x margin\).*retrain with sigmoid=1"):
        build_artifact(tmp_path / "alpha.txt", tmp_path / "out", name="alpha")
