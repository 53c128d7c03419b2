"""Model files -> native shared libraries with manifests, and the native call path."""
from ._native import Calibrator, NativeWorker, rows_matrix
from .artifact import CompiledModel, build_artifact, load_artifact
from .calibrated import calibrator
from .errors import ArtifactError, ModelFormatError
from .manifest import Manifest

__all__ = ["Calibrator", "calibrator", "NativeWorker", "rows_matrix", "CompiledModel", "build_artifact", "load_artifact", "ArtifactError", "ModelFormatError", "Manifest"]
