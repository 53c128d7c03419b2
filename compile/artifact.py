"""Compiled model artifacts: build one from a model file, load one for serving.

An artifact is a directory holding the shared library and its manifest.  The
library's file name embeds name, version and a digest prefix because the
dynamic loader caches libraries by path: a new version must never reuse one."""

from __future__ import annotations

import datetime as _dt
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time

import numpy as np
import tl2cgen
import treelite

from muse.calib.kernels import correction
from muse.calib.names import LimitError, check_name

from . import codegen, probe
from ._library import NativeLibrary, NativeLoadError, NativeMapTable
from ._worker import NativeWorker
from .errors import ArtifactError, ModelFormatError
from .frontends import SourceModel, load_source_model
from .manifest import Manifest, read_manifest, sha256_file, write_manifest
from .scores import Scores


def next_version(model_dir: pathlib.Path) -> str:
    numeric = [int(p.name) for p in model_dir.glob("*") if p.name.isdigit()] if model_dir.is_dir() else []
    return str(max(numeric, default=0) + 1)


# Staging folders: models_dir/NAME/.NAME-VERSION.pidPID@HOST-RANDOM, so the next compile can tell
# a folder whose compile was killed (SIGKILL, power loss: nothing ran to remove it) from one
# still in use.  RANDOM is tempfile's suffix: letters, digits and '_'.
_STAGING_RE = re.compile(r"^\..+\.pid(\d+)@(.*)-[a-z0-9_]+$")


def _host() -> str:
    """This machine, as staging folder names carry it: pids are only comparable on one host
    (and in one container, which usually has a hostname of its own)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40]


def _staging_prefix(name: str, version: str) -> str:
    return f".{name}-{version}.pid{os.getpid()}@{_host()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(models_dir: pathlib.Path) -> list[pathlib.Path]:
    """Remove staging folders under ``models_dir/*/`` whose compile is gone (its process died on
    this host without cleaning up); returns what was removed.  Folders of live compiles, of other
    hosts, and anything not named like a staging folder are kept."""
    removed = []
    host = _host()
    for folder in pathlib.Path(models_dir).glob("*/.*"):
        match = _STAGING_RE.match(folder.name)
        if not match or match.group(2) != host or not folder.is_dir() or folder.is_symlink():
            continue
        if _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def expected_margins(source: SourceModel, rows: np.ndarray) -> np.ndarray:
    """Treelite's own raw margins (GTIL, no compiled code) for ``rows``: the positive class."""
    X = rows.astype(np.float32) if source.float32_inputs else rows
    if source.float32_base_margin is None:
        pred = treelite.gtil.predict(source.model, X, pred_margin=True)
        return np.asarray(pred, dtype=np.float64).reshape(len(rows), -1)[:, source.output_index]
    # XGBoost adds its float32 leaves tree by tree to its own (clamped) float32 base margin, as the
    # compiled code does; GTIL's sum starts from 0 and adds the base last, which on a thousand trees
    # far from base 0.5 differs by more than the probe allows: the per-tree values, summed here.
    per_tree = treelite.gtil.predict_per_tree(source.model, X)
    leaves = np.asarray(per_tree, dtype=np.float32).reshape(len(rows), -1)
    total = np.full(len(rows), np.float32(source.float32_base_margin), dtype=np.float32)
    for t in range(leaves.shape[1]):
        total = total + leaves[:, t]
    return total.astype(np.float64)


def build_artifact(
    model_file: str | pathlib.Path,
    models_dir: str | pathlib.Path,
    name: str,
    version: str | None = None,
    beta: float = 1.0,
    fmt: str = "auto",
    jobs: int | None = None,
    progress: codegen.Progress | None = None,
) -> pathlib.Path:
    """Compile ``model_file`` into ``models_dir/name/version``; returns that directory."""
    check_name("model name", name)
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    model_dir = pathlib.Path(models_dir) / name
    version = check_name("version", version or next_version(model_dir))
    target = model_dir / version
    if target.exists():
        raise FileExistsError(f"{target} already exists: versions are immutable, pick a new --version")
    started = time.perf_counter()
    source = load_source_model(model_file, fmt)
    compiler = codegen.compiler_version()
    params = codegen.codegen_params(source.model.num_tree, source.model.num_feature)
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_dir.parent)
    # TemporaryDirectory removes the folder on any way out of the block, KeyboardInterrupt included;
    # a SIGKILL leaves it for the next compile's remove_stale_staging.
    with tempfile.TemporaryDirectory(prefix=_staging_prefix(name, version), dir=model_dir) as tmp:
        work = pathlib.Path(tmp)
        src_dir = work / "src"
        src_dir.mkdir()
        sources = codegen.generate_sources(source, src_dir, params)
        staged = work / "lib.so"
        flags = codegen.build_library(source, sources, staged, jobs=jobs, progress=progress)
        lib_sha = sha256_file(staged)
        # The new library's first load is a probe in a child process: its margins on the probe
        # batch must match Treelite's prediction of the source model, and are stored as what
        # every later load must reproduce.
        rows = probe.probe_rows(probe.PROBE_SEED, probe.PROBE_ROWS, int(source.model.num_feature))
        probe_spec = probe.make_probe(staged, probe.PROBE_SEED, rows, expected_margins(source, rows))
        lib_name = f"lib{name}-{version}-{lib_sha[:12]}.so"
        out = work / "artifact"
        out.mkdir()
        shutil.move(staged, out / lib_name)
        manifest = Manifest(
            name=name,
            version=version,
            format=source.format,
            objective=source.objective,
            margin_kind=source.margin_kind,
            output_transform="sigmoid" if source.margin_kind == "logit" else "identity",
            feature_names=source.feature_names,
            num_feature=int(source.model.num_feature),
            num_tree=int(source.model.num_tree),
            beta=float(beta),
            source_file=pathlib.Path(model_file).name,
            source_sha256=sha256_file(pathlib.Path(model_file)),
            library_file=lib_name,
            library_sha256=lib_sha,
            treelite_version=treelite.__version__,
            tl2cgen_version=tl2cgen.__version__,
            compiler=compiler,
            compiler_flags=flags,
            codegen_params=params,
            compile_seconds=round(time.perf_counter() - started, 3),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            probe=probe_spec,
        )
        write_manifest(out, manifest)
        # Appear atomically: a half-written version is never visible to a loader.
        out.rename(target)
    probe.remember(target / lib_name, lib_sha)  # probed above, under its staging name
    return target


class CompiledModel:
    """A verified, loaded artifact.  ``predict`` is thread-safe and releases the GIL."""

    __slots__ = ("manifest", "directory", "_lib", "_correction")

    def __init__(self, directory: pathlib.Path, manifest: Manifest, lib: NativeLibrary):
        self.directory = directory
        self.manifest = manifest
        self._lib = lib
        self._correction = correction(manifest.beta, manifest.margin_kind)

    @property
    def key(self) -> str:
        return f"{self.manifest.name}/{self.manifest.version}"

    @property
    def num_feature(self) -> int:
        return self.manifest.num_feature

    def predict(self, X: np.ndarray, margin: bool = False) -> np.ndarray:
        """Probabilities (or raw margins) for a [rows, features] float32/float64 matrix."""
        return self._lib.predict(X, margin)

    def score(self, X: np.ndarray, maps: NativeMapTable, map_index: int | np.ndarray = 0) -> Scores:
        """Margins, posterior-corrected scores (this model's beta) and scores mapped through map
        ``map_index`` of ``maps`` (an int, or an int64 vector with one per row): one native call
        on this thread, GIL released."""
        X, scores = _call_arrays(X)
        self._lib.run(X, scores.array, True, maps, *self._correction, map_index)
        return scores

    def submit(
        self, worker: NativeWorker, X: np.ndarray, maps: NativeMapTable, map_index: int | np.ndarray = 0
    ) -> tuple[int, Scores, tuple]:
        """Queue what ``score`` computes on a native worker thread (see ModelThread, which
        awaits it).  Returns (call id, the Scores it fills, what the call reads): keep all
        until ``worker.completed()`` reports the id, then ask ``failure`` about its code."""
        X, scores = _call_arrays(X)
        call = worker.submit(self._lib, X, scores.array, True, maps, *self._correction, map_index)
        return call, scores, (X, map_index)

    def failure(self, rc: int, rows: int) -> Exception | None:
        """The exception a native call's return code stands for, or None for success."""
        return self._lib.failure(rc, rows)

    def __repr__(self) -> str:
        return f"CompiledModel({self.key}, {self.manifest.num_tree} trees, {self.num_feature} features)"


def _call_arrays(X: np.ndarray) -> tuple[np.ndarray, Scores]:
    """(features as the native call takes them, the Scores it writes)."""
    X = np.ascontiguousarray(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
    return X, Scores.empty(len(X))


def load_artifact(directory: str | pathlib.Path) -> CompiledModel:
    directory = pathlib.Path(directory)
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{directory}: no manifest.json; is this a compiled model directory?") from exc
    except LimitError as exc:  # names the file and the limit
        raise ArtifactError(str(exc)) from exc
    except Exception as exc:
        raise ArtifactError(f"{directory}/manifest.json: invalid manifest ({exc})") from exc
    lib_path = directory / manifest.library_file
    if not lib_path.is_file():
        raise ArtifactError(f"{lib_path}: library named in the manifest is missing")
    actual = sha256_file(lib_path)
    if actual != manifest.library_sha256:
        raise ArtifactError(
            f"{lib_path}: sha256 {actual[:16]}... does not match the manifest's {manifest.library_sha256[:16]}...; "
            "the library was modified or corrupted, recompile the model"
        )
    # Loaded, warmed up and checked against the manifest's expected output in a child process
    # first (once per library per process): a library that crashes there never loads here.
    probe.verify_library(lib_path, manifest, actual)
    try:
        lib = NativeLibrary(str(lib_path.resolve()))
    except NativeLoadError as exc:
        raise ArtifactError(str(exc)) from exc
    if lib.num_feature != manifest.num_feature:
        raise ArtifactError(f"{lib_path}: library has {lib.num_feature} features, manifest says {manifest.num_feature}")
    return CompiledModel(directory, manifest, lib)


__all__ = ["ArtifactError", "CompiledModel", "ModelFormatError", "build_artifact", "load_artifact"]
