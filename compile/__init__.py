"""Model files -> native shared libraries with manifests, and the native call path."""

from ._library import NativeMapTable
from ._worker import NativeWorker
from .artifact import CompiledModel, build_artifact, load_artifact
from .errors import ArtifactError, ModelFormatError
from .manifest import Manifest
from .model_thread import ModelThread
from .native_maps import native_map_table
from .scores import Scores

__all__ = [
    "ArtifactError",
    "CompiledModel",
    "Manifest",
    "ModelFormatError",
    "ModelThread",
    "NativeMapTable",
    "NativeWorker",
    "Scores",
    "build_artifact",
    "load_artifact",
    "native_map_table",
]
