"""The manifest that travels with every compiled model library."""

from __future__ import annotations

import hashlib
import pathlib

import msgspec

MANIFEST_FILE = "manifest.json"


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the library must score before it is served (muse.compile.probe): the batch
    ``probe_rows(seed, rows, num_feature)`` and the raw margins the library returned for it at
    compile time, which matched Treelite's own prediction of the source model."""

    seed: int
    rows: int
    margins: list[float]


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: str
    format: str
    objective: str
    margin_kind: str  # "logit" or "probability": what predict(margin=True) returns
    output_transform: str  # applied by predict(margin=False): "sigmoid" or "identity"
    feature_names: list[str]
    num_feature: int
    num_tree: int
    beta: float  # negative keep-rate used at training (1 = no undersampling)
    source_file: str
    source_sha256: str
    library_file: str
    library_sha256: str
    treelite_version: str
    tl2cgen_version: str
    compiler: str
    compiler_flags: list[str]
    codegen_params: dict[str, int]
    compile_seconds: float
    created_at: str
    # None in manifests written before probes existed: those libraries are only checked to load
    # and score finite values (muse.compile.probe.verify_library).
    probe: Probe | None = None


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(Manifest)


def write_manifest(directory: pathlib.Path, manifest: Manifest) -> pathlib.Path:
    path = directory / MANIFEST_FILE
    path.write_bytes(msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n")
    return path


def read_manifest(directory: pathlib.Path) -> Manifest:
    return _decoder.decode((directory / MANIFEST_FILE).read_bytes())


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
