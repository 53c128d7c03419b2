"""Errors raised while reading, compiling or loading a model."""


class ModelFormatError(ValueError):
    """A model file that cannot be compiled: corrupt, truncated, unsupported or not binary."""


class ArtifactError(RuntimeError):
    """A compiled artifact that must not be served: missing, tampered or unloadable."""
