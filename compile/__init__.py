"""Model files -> native shared libraries with manifests, and the native call path."""
from ._native import NativeWorker, rows_matrix
from .artifact import CompiledModel, build_artifact, load_artifact
from .errors import ArtifactError, ModelFormatError
from .manifest import Manifest

__all__ = ["NativeWorker", "rows_matrix", "CompiledModel", "build_artifact", "load_artifact", "ArtifactError", "ModelFormatError", "Manifest"]
