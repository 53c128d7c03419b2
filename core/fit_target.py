"""What a predictor's calibration is fitted for: one compiled model, or an ensemble's combined scores.

A deployment accepts a calibration only for the identity given here (core.snapshot checks it),
and a map is fitted on scores corrected with this beta."""

from __future__ import annotations

from dataclasses import dataclass

from muse.calib import ModelIdentity
from muse.compile import CompiledModel

from .deploy import DeploymentStore
from .predictor import ensemble_identity
from .registry import Registry
from .spec import PredictorSpec


@dataclass(frozen=True)
class FitTarget:
    identity: ModelIdentity  # what the deployment's validation compares (core.snapshot)
    beta: float  # the posterior correction of the calibrated scores' margins
    margin_kind: str  # what a 'margin' column holds: "logit" or "probability"
    label: str
    default_name: str
    model: CompiledModel | None  # None: an ensemble (scored only through its log rows)


def model_target(model: CompiledModel) -> FitTarget:
    m = model.manifest
    identity = ModelIdentity(m.name, m.version, m.library_sha256)
    return FitTarget(identity, m.beta, m.margin_kind, f"model {m.name}/{m.version}", m.name, model)


def ensemble_target(reg: Registry, p: PredictorSpec) -> FitTarget:
    """An ensemble predictor's calibration: core.snapshot validates it against
    ensemble_identity(name, version, member library hashes).  Its scores (and log rows) are
    its members' combined corrected scores (core.predictor: mean of margin + ln beta through
    the logistic, or mean of corrected probabilities), so no further correction: beta 1, and
    its 'margin' column is that mean logit (mean_logit) or the corrected probability."""
    members = [reg.load_model(ref).manifest for ref in p.models]
    identity = ensemble_identity(p.name, p.version, members, p.combine)
    kind = "logit" if p.combine == "mean_logit" else "probability"
    label = f"ensemble {p.name}/{p.version} ({' + '.join(p.models)}, {p.combine})"
    return FitTarget(identity, 1.0, kind, label, p.name, None)


def predictor_target(reg: Registry, p: PredictorSpec) -> FitTarget:
    """The target of a deployed predictor: its model, or its ensemble."""
    if len(p.models) == 1:
        return model_target(reg.load_model(p.models[0]))
    return ensemble_target(reg, p)


def deployed_predictor(reg: Registry, name: str) -> tuple[int, PredictorSpec] | None:
    """Predictor ``name`` in the registry's current deployment, with its generation."""
    store = DeploymentStore(reg)
    generation = store.current_generation()
    if generation is None:
        return None
    found = store.read(generation).predictor(name)
    return None if found is None else (generation, found)
