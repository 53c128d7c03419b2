"""The manifest that travels with every compiled model library."""

from __future__ import annotations

import contextlib
import hashlib
import pathlib

import msgspec

from muse.calib.names import MAX_ELEMENTS, parse_document

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


# Too short to hold more than MAX_ELEMENTS values: each takes at least a byte and a comma.
_FAST_PATH_BYTES = 2 * MAX_ELEMENTS


def read_manifest(directory: pathlib.Path) -> Manifest:
    """The manifest in ``directory``, within the document limits (muse.calib.names).

    LimitError (a ValueError naming the file and the limit) for a manifest nested deeper than
    MAX_DEPTH or holding more than MAX_ELEMENTS values; msgspec.DecodeError / ValidationError,
    as msgspec.json words them, for one that is not valid JSON or not a manifest; OSError
    (FileNotFoundError) when it cannot be read."""
    path = directory / MANIFEST_FILE
    raw = path.read_bytes()
    # Manifests are read at every model load, so a short one is decoded straight into the Struct:
    # 3 us against 13 for parse_document + msgspec.convert (6 features; 23 against 99 at 1,000).
    # That is within the limits too: the typed decoder stops at the first value of the wrong type
    # and refuses unknown fields, so what it accepts nests no deeper than the Struct (3 levels),
    # and a document this short holds at most MAX_ELEMENTS values.  What it refuses, and long
    # documents, are checked against the limits, so a LimitError names what is wrong there.
    if len(raw) <= _FAST_PATH_BYTES:
        try:
            return _decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            pass
    with contextlib.suppress(msgspec.DecodeError):  # not JSON: the typed decoder says where, as it always has
        parse_document(raw, str(path), toml=False)  # LimitError beyond the limits
    return _decoder.decode(raw)  # within the limits now, so no RecursionError


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
