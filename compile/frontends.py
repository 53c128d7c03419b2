"""Model files -> Treelite models, one reader per training library.

Each reader also recovers what Treelite does not keep: feature names and the
kind of the model's raw output (a logit, or already a probability)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import pathlib
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import treelite

from .errors import ModelFormatError

FORMATS = ("lightgbm", "xgboost", "sklearn")

# Treelite's TaskType enum values.
_TASK_BINARY, _TASK_REGRESSOR, _TASK_MULTICLASS = 0, 1, 2


@dataclass(frozen=True)
class SourceModel:
    path: pathlib.Path
    format: str
    model: treelite.Model
    feature_names: list[str]
    objective: str  # what the library calls the training objective
    output_index: int  # which per-row output is the positive class
    output_width: int
    margin_kind: str  # "logit": margins are log-odds; "probability": margins already are probabilities
    float32_inputs: bool  # the library rounds inputs to float32 before comparing (XGBoost, sklearn trees)
    # XGBoost only: the margin every row starts from, as XGBoost computes it (float32).  XGBoost
    # adds each tree's float32 leaf to it in float32, tree by tree; codegen copies that order.
    float32_base_margin: float | None = None


def detect_format(path: pathlib.Path) -> str:
    head = path.read_bytes()[:64]
    if not head:
        raise ModelFormatError(f"{path}: file is empty")
    if head.startswith(b"\x80") or path.suffix in (".pkl", ".pickle", ".joblib"):
        return "sklearn"
    stripped = head.lstrip()
    if stripped.startswith(b"tree") or b"version=v" in head:
        return "lightgbm"
    if stripped.startswith(b"{") or path.suffix in (".json", ".ubj"):
        return "xgboost"
    raise ModelFormatError(
        f"{path}: cannot tell the model format from its contents; pass --format lightgbm|xgboost|sklearn"
    )


def load_source_model(path: str | pathlib.Path, fmt: str = "auto") -> SourceModel:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such model file")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ModelFormatError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    reader = {"lightgbm": _read_lightgbm, "xgboost": _read_xgboost, "sklearn": _read_sklearn}[fmt]
    try:
        model, names, objective, float32_inputs = reader(path)
    except ModelFormatError:
        raise
    except Exception as exc:  # frontends raise many types for bad bytes
        raise ModelFormatError(f"{path}: not a readable {fmt} model ({_first_line(exc)})") from exc
    return _describe(path, fmt, model, names, objective, float32_inputs)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _describe(path, fmt, model, names, objective, float32_inputs) -> SourceModel:
    header = model.get_header_accessor()
    task = int(header.get_field("task_type")[0])
    num_class = [int(c) for c in header.get_field("num_class")]
    num_target = int(header.get_field("num_target")[0])
    postprocessor = str(header.get_field("postprocessor"))
    if num_target != 1:
        raise ModelFormatError(f"{path}: model has {num_target} targets; MUSE serves single-target binary classifiers")
    if task == _TASK_BINARY and num_class == [1] and postprocessor == "sigmoid":
        output_index, width, margin_kind = 0, 1, "logit"
        alpha = float(header.get_field("sigmoid_alpha")[0])
        if abs(alpha - 1.0) > 1e-6:  # stored as float32: 1 exactly when not set
            raise ModelFormatError(
                f"{path}: its probability is sigmoid({alpha:g} x margin) (LightGBM's sigmoid parameter); MUSE's "
                "posterior correction and quantile maps take sigmoid(margin): retrain with sigmoid=1"
            )
    elif task == _TASK_MULTICLASS and num_class == [2] and postprocessor == "identity_multiclass":
        # scikit-learn forests: averaged leaf class probabilities, column 1 is the positive class.
        output_index, width, margin_kind = 1, 2, "probability"
    elif task == _TASK_MULTICLASS or max(num_class) > 1:
        raise ModelFormatError(
            f"{path}: multi-class model ({max(num_class)} classes); MUSE serves binary classifiers only"
        )
    else:
        raise ModelFormatError(
            f"{path}: objective {objective!r} (postprocessor {postprocessor}) is not a binary classifier; "
            "train with a binary objective (LightGBM 'binary', XGBoost 'binary:logistic')"
        )
    nfeat = int(model.num_feature)
    if not names or len(names) != nfeat:
        names = [f"f{i}" for i in range(nfeat)]
    base_margin = None
    if fmt == "xgboost":
        base_margin = xgboost_base_margin(float(header.get_field("base_scores")[0]))
    return SourceModel(
        path, fmt, model, list(names), objective, output_index, width, margin_kind, float32_inputs, base_margin
    )


def xgboost_base_margin(treelite_base: float) -> float:
    """XGBoost's starting margin for a binary:logistic model, from Treelite's.

    XGBoost keeps base_score as a float32 probability p and turns it into a margin in float32
    arithmetic: -logf(1.0f / p - 1.0f), p clamped to [1e-6, 1 - 1e-6] (LogisticRegression::
    ProbToMargin and common::Logit in its src/objective/regression_loss.h and src/common/math.h).
    Treelite computes -log(1.0 / p - 1.0) in float64, which differs from that by an ulp or more in
    most models.  The float64 logit is invertible well within float32 precision, so p is recovered
    exactly, and XGBoost's arithmetic redone: logf is the C library's, as XGBoost calls it."""
    if math.isnan(treelite_base):
        raise ModelFormatError(f"XGBoost base score is {treelite_base}")
    if math.isinf(treelite_base):
        p = np.float32(0.0 if treelite_base < 0 else 1.0)
    else:
        e = math.exp(-abs(treelite_base))  # the logistic function, to float64 precision on both sides
        p = np.float32(1.0 / (1.0 + e) if treelite_base >= 0 else e / (1.0 + e))
        for candidate in (p, np.nextafter(p, np.float32(0)), np.nextafter(p, np.float32(1))):
            if 0 < candidate < 1 and -math.log(1.0 / float(candidate) - 1.0) == treelite_base:
                p = candidate
                break
    eps = np.float32(1e-6)  # XGBoost's kRtEps
    p = min(max(p, eps), np.float32(1) - eps)
    return -_logf(np.float32(1) / p - np.float32(1))


@functools.cache
def _libm_logf():
    name = ctypes.util.find_library("m")
    try:
        logf = ctypes.CDLL(name).logf if name else None
    except (OSError, AttributeError):
        logf = None
    if logf is not None:
        logf.restype, logf.argtypes = ctypes.c_float, [ctypes.c_float]
    return logf


def _logf(x: np.float32) -> float:
    """The C library's logf(x) (a float32, returned as a Python float); where it cannot be
    called, the float64 logarithm rounded to float32 (the correctly rounded value)."""
    logf = _libm_logf()
    return float(np.float32(logf(float(x)) if logf is not None else math.log(float(x))))


_LGB_MISSING_ZERO = 1  # LightGBM's MissingType::Zero, in bits 2-3 of a node's decision_type


def _read_lightgbm(path: pathlib.Path):
    text = path.read_text(errors="replace")
    if "end of trees" not in text:
        raise ModelFormatError(f"{path}: LightGBM model is truncated (no 'end of trees' marker)")
    names, objective = [], ""
    for line in text.splitlines():
        if line.startswith("feature_names="):
            names = line.split("=", 1)[1].split()
        elif line.startswith("objective=") and not objective:
            objective = line.split("=", 1)[1].split()[0]
        elif line.startswith("Tree="):
            break
    _refuse_zero_as_missing(path, text)
    return treelite.frontend.load_lightgbm_model(path), names, objective, False


def _refuse_zero_as_missing(path: pathlib.Path, text: str) -> None:
    """LightGBM sends zero and missing values of a node with missing type Zero (trained with
    zero_as_missing=true) to its default child; Treelite's loader compares them with the threshold
    instead, so where the two differ every generator would score those rows wrong, silently."""
    tree, fields = -1, dict[str, list[str]]()
    for line in text.splitlines():
        if line.startswith("Tree="):
            tree, fields = _number(path, line, int), {}
        elif line.startswith(("decision_type=", "threshold=")):
            key, _, values = line.partition("=")
            fields[key] = values.split()
            if len(fields) < 2:
                continue
            if len(fields["decision_type"]) != len(fields["threshold"]):
                raise ModelFormatError(f"{path}: tree {tree}: decision_type and threshold differ in length")
            for node, (dt, th) in enumerate(zip(fields["decision_type"], fields["threshold"], strict=True)):
                kind = _number(path, dt, int)
                zero_left = _number(path, th, float) >= 0.0  # where Treelite sends them: 0 <= threshold goes left
                if kind & 1 == 0 and (kind >> 2) & 3 == _LGB_MISSING_ZERO and bool(kind & 2) != zero_left:
                    raise ModelFormatError(
                        f"{path}: tree {tree}, node {node}: trained with zero_as_missing=true, this node sends zeros "
                        f"and missing values {'left' if kind & 2 else 'right'}, which the compiler would read the "
                        "other way; MUSE cannot score such models exactly yet: retrain with zero_as_missing=false"
                    )


def _number(path: pathlib.Path, text: str, kind: type[int] | type[float]) -> Any:
    """``text`` (or what follows '=' in it) as ``kind``; ModelFormatError naming the file if it is not one."""
    value = text.split("=", 1)[-1]
    try:
        return kind(value)
    except ValueError:
        raise ModelFormatError(f"{path}: {value[:40]!r} is not a number; the model file is corrupt") from None


def _read_xgboost(path: pathlib.Path):
    raw = path.read_bytes()
    is_json = raw.lstrip()[:1] == b"{" and raw.lstrip()[1:2] in (b'"', b"\n", b" ", b"\r", b"\t", b"}")
    if is_json:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ModelFormatError(f"{path}: XGBoost JSON is corrupt or truncated ({exc})") from exc
        learner = doc.get("learner", {}) if isinstance(doc, dict) else {}
        names = learner.get("feature_names") or []
        objective = learner.get("objective", {}).get("name", "")
        model = treelite.frontend.load_xgboost_model(path, format_choice="json")
        return model, names, objective, True
    model = treelite.frontend.load_xgboost_model(path, format_choice="ubjson")
    names, objective = _xgboost_ubjson_meta(path)
    # XGBoost stores every input as float32 (DMatrix) before comparing.
    return model, names, objective, True


def _xgboost_ubjson_meta(path: pathlib.Path):
    """Feature names from a UBJSON model, through xgboost itself when installed."""
    try:
        import xgboost
    except ImportError:
        return [], ""
    booster = xgboost.Booster(model_file=str(path))
    config = json.loads(booster.save_config())
    return list(booster.feature_names or []), config["learner"]["objective"]["name"]


_SKLEARN_SUPPORTED = (
    "GradientBoostingClassifier",
    "HistGradientBoostingClassifier",
    "RandomForestClassifier",
    "ExtraTreesClassifier",
)


def _read_sklearn(path: pathlib.Path):
    # Unpickling runs code from the file: compile only models you trust.
    with path.open("rb") as fh:
        try:
            est = pickle.load(fh)
        except Exception as exc:
            raise ModelFormatError(f"{path}: not a readable pickle ({_first_line(exc)})") from exc
    kind = type(est).__name__
    if kind not in _SKLEARN_SUPPORTED:
        raise ModelFormatError(
            f"{path}: unsupported scikit-learn estimator {kind}; supported: {', '.join(_SKLEARN_SUPPORTED)}"
        )
    classes = getattr(est, "classes_", None)
    if classes is None or len(classes) != 2:
        n = "unfitted" if classes is None else f"{len(classes)} classes"
        raise ModelFormatError(f"{path}: {kind} is {n}; MUSE serves binary classifiers only")
    names = [str(n) for n in getattr(est, "feature_names_in_", [])]
    # sklearn's DecisionTree-based estimators cast X to float32 before comparing;
    # HistGradientBoosting compares float64.  Parity means copying that.
    float32_inputs = kind != "HistGradientBoostingClassifier"
    return treelite.sklearn.import_model(est), names, kind, float32_inputs
