"""The score transformation: posterior correction and quantile mapping.

Pure math over arrays; knows nothing of models or HTTP."""

from .artifact import (
    Calibration,
    CalibrationError,
    ModelIdentity,
    make_calibration,
    read_calibration,
    write_calibration,
)
from .kernels import MapTable
from .posterior import correct_margins, correct_probabilities, undo_correction
from .quantile_map import QuantileMap, SampleError, alert_rates, fit_quantile_map, identity_map
from .reference import (
    AlertRateCurve,
    QuantileTable,
    Reference,
    ReferenceError,
    ReferenceFile,
    inverse_cdf,
    load_reference,
)
from .samples import fit_per_group, read_scores

__all__ = [
    "AlertRateCurve",
    "Calibration",
    "CalibrationError",
    "MapTable",
    "ModelIdentity",
    "QuantileMap",
    "QuantileTable",
    "Reference",
    "ReferenceError",
    "ReferenceFile",
    "SampleError",
    "alert_rates",
    "correct_margins",
    "correct_probabilities",
    "fit_per_group",
    "fit_quantile_map",
    "identity_map",
    "inverse_cdf",
    "load_reference",
    "make_calibration",
    "read_calibration",
    "read_scores",
    "undo_correction",
    "write_calibration",
]
