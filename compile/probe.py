"""Untrusted native code never enters this process first.

A model library is native code: a corrupt or foreign one whose manifest checksum was
updated to match can crash whatever loads it.  So before this process dlopens a library,
a short-lived child process (_probe_child.py, standard library only) loads it, scores a
probe batch and reports; a crash, a non-zero exit or a timeout there is a refusal
(ArtifactError), and only a library whose scores matched the manifest's expected output
is loaded here.  Each library is probed once per process: the verdict is cached by
(resolved path, sha256).

The probe batch is deterministic: ``probe_rows(seed, rows, num_feature)`` regenerates it
from what the manifest stores (no random generator whose stream could change between
numpy versions), and every value is exactly representable as float32, so the float32 and
float64 entry points must agree on it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading

import numpy as np

from ._library import ABI_VERSION
from .errors import ArtifactError
from .manifest import Manifest, Probe

PROBE_SEED = 20240614
PROBE_ROWS = 80  # more than one 64-row block of either entry point (codegen.BLOCK_ROWS, MUSE_ROW_BLOCK)
PROBE_TIMEOUT = 60.0  # seconds the child may take to load and score; a hang is a refusal
# Margins must match the expected output this closely (relative, and absolute near zero): the
# library is deterministic, so this only allows for the rounding of a different compiler run.
RTOL, ATOL = 1e-5, 1e-6
CHILD = pathlib.Path(__file__).with_name("_probe_child.py")
EXIT_REFUSED = 3  # _probe_child.EXIT_REFUSED: the child refused the library with a message
SINGLE_ROWS = 3  # _probe_child.SINGLE_ROWS: rows it also scores one per call

_verified: set[tuple[str, str]] = set()
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def probe_rows(seed: int, rows: int, num_feature: int) -> np.ndarray:
    """A [rows, num_feature] float64 batch, a pure function of its arguments: row 0 all missing
    (NaN), row 1 all zeros, then per value ~10% NaN, ~5% zero, ~20% small integers in [-3, 30]
    (category codes, ties on integer thresholds) and the rest signed values with magnitudes
    from 2**-10 to 2**11 -- all exact float32 values, built with integer arithmetic only."""
    n = rows * num_feature
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 means it to
        z = (np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    kind = (z & np.uint64(0xFF)).astype(np.int64)  # 0..255
    sign = np.where((z >> np.uint64(8)) & np.uint64(1), -1.0, 1.0)
    mantissa = ((z >> np.uint64(9)) & np.uint64(0x7FFFFF)).astype(np.float64)  # 23 bits
    exponent = ((z >> np.uint64(32)) % np.uint64(22)).astype(np.int64) - 10  # -10..11
    small = ((z >> np.uint64(40)) % np.uint64(34)).astype(np.float64) - 3.0  # -3..30
    values = sign * np.ldexp(1.0 + mantissa / 2.0**23, exponent)
    values = np.where(kind < 77, small, values)  # kinds 26..76
    values = np.where(kind < 26, 0.0, values)  # kinds 13..25
    values = np.where(kind < 13, np.nan, values)  # kinds 0..12 (with zeros: ~10% and ~5%)
    out = values.reshape(rows, num_feature)
    out[0, :] = np.nan
    if rows > 1:
        out[1, :] = 0.0
    return out


def verify_library(lib_path: pathlib.Path, manifest: Manifest, sha256: str) -> None:
    """Raise ArtifactError unless ``lib_path`` (whose content hashes to ``sha256``) loads and scores
    the manifest's probe batch as expected, in a child process.  Once per library per process."""
    key = (str(lib_path.resolve()), sha256)
    if key in _verified:
        return
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # two threads loading one library start one child
        if key in _verified:
            return
        spec = manifest.probe
        # Manifests written before probes existed carry no expected output: the child then only
        # proves that the library loads and scores finite values, consistently across its entry
        # points, on the default probe batch.
        seed, nrow = (spec.seed, spec.rows) if spec is not None else (PROBE_SEED, PROBE_ROWS)
        rows = probe_rows(seed, nrow, manifest.num_feature)
        outputs = run_probe(lib_path, manifest.num_feature, rows)
        expected = np.asarray(spec.margins, dtype=np.float64) if spec is not None else None
        check_outputs(lib_path, outputs, expected, "the manifest's expected output")
        _verified.add(key)


def remember(lib_path: pathlib.Path, sha256: str) -> None:
    """Record ``lib_path`` as verified (build_artifact probed it under its staging name)."""
    _verified.add((str(lib_path.resolve()), sha256))


def make_probe(lib_path: pathlib.Path, seed: int, rows: np.ndarray, expected: np.ndarray) -> Probe:
    """Score ``rows`` (``probe_rows(seed, ...)``) with a freshly built library in a child, check its
    margins against ``expected`` (Treelite's own prediction of the source model) and return the
    Probe the manifest stores: the library's margins."""
    outputs = run_probe(lib_path, rows.shape[1], rows)
    fix = "the compiled code does not compute the model: a bug in MUSE's code generation, please report it"
    check_outputs(lib_path, outputs, expected, "Treelite's prediction of the source model", fix)
    return Probe(seed=seed, rows=len(rows), margins=[float(v) for v in outputs["margins"]])


def run_probe(lib_path: pathlib.Path, num_feature: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Load ``lib_path`` in a child process and score ``rows`` with it; returns its outputs by name
    (see _probe_child.py).  ArtifactError if the child refuses, crashes, fails or hangs."""
    lib_path = pathlib.Path(lib_path)
    if not sys.executable:
        raise ArtifactError(f"{lib_path}: cannot probe the library: no Python executable to run the probe in")
    cmd = [sys.executable, "-I", "-S", str(CHILD), str(lib_path.resolve()), str(num_feature), str(len(rows))]
    cmd.append(str(ABI_VERSION))
    data = np.ascontiguousarray(rows, dtype=np.float64).tobytes()
    try:
        child = _start_child(cmd)
    except OSError as exc:
        raise ArtifactError(f"{lib_path}: cannot start the process that probes the library ({exc})") from exc
    try:
        out, err = child.communicate(data, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        out, _ = _kill(child)
        stage = _stage(_report(out))
        raise ArtifactError(
            f"{lib_path}: hung for {PROBE_TIMEOUT:g} s while {stage} in a probe process, and was killed; "
            "nothing was loaded into this process. The library is broken: recompile the model with `muse compile`"
        ) from None
    finally:
        if child.poll() is None:  # interrupted (KeyboardInterrupt): no orphan keeps running
            _kill(child)
    report = _report(out)
    stage = _stage(report)
    rc = child.returncode
    if rc == EXIT_REFUSED and "error" in report:
        raise ArtifactError(report["error"][-1])
    if rc < 0:
        raise ArtifactError(
            f"{lib_path}: killed by {_signal_name(-rc)} while {stage} in a probe process; nothing was loaded into "
            "this process. The library is corrupt or was not built by MUSE: recompile the model with `muse compile`"
        )
    if rc != 0 or stage != "done":
        detail = err.decode(errors="replace").strip().splitlines()
        tail = f" ({detail[-1][:300]})" if detail else ""
        raise ArtifactError(
            f"{lib_path}: the probe process exited with status {rc} while {stage}{tail}; nothing was loaded into "
            "this process. The library is corrupt or was not built by MUSE: recompile the model with `muse compile`"
        )
    outputs: dict[str, np.ndarray] = {}
    for line in report.get("result", []):
        name, *values = line.split(" ")
        outputs[name] = np.array([float(v) for v in values], dtype=np.float64)
    return outputs


def _start_child(cmd: list[str]) -> subprocess.Popen:
    # close_fds (the default): the child inherits no listening socket or other descriptor of this
    # process.  Its own session: a timeout kills everything the library may have started.
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,
        cwd="/",
    )


def _kill(child: subprocess.Popen) -> tuple[bytes, bytes]:
    """Kill the child and whatever it started; returns everything it wrote."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
    child.kill()
    return child.communicate()


def _report(out: bytes) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {}
    for line in out.decode(errors="replace").splitlines():
        kind, _, text = line.partition(" ")
        report.setdefault(kind, []).append(text)
    return report


def _stage(report: dict[str, list[str]]) -> str:
    stages = report.get("stage")
    return stages[-1] if stages else "starting"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


RECOMPILE = "the library does not compute this model: recompile it with `muse compile`"


def check_outputs(
    lib_path: pathlib.Path,
    outputs: dict[str, np.ndarray],
    expected: np.ndarray | None,
    what: str,
    fix: str = RECOMPILE,
) -> None:
    """ArtifactError unless the child's outputs are complete and finite and its margins agree with
    ``expected`` (``what`` names it; ``fix`` says what to do).  Its float32 and one-row margins
    must match the float64 batch margins, and its probabilities lie in [0, 1]."""
    margins = outputs.get("margins")
    nrow = len(expected) if expected is not None else len(margins) if margins is not None else 0
    sizes = {"margins": nrow, "margins_f32": nrow, "single": min(SINGLE_ROWS, nrow), "output": nrow}
    for name, size in sizes.items():
        got = outputs.get(name)
        if nrow == 0 or got is None or len(got) != size:
            raise ArtifactError(f"{lib_path}: the probe process returned no complete {name!r} scores; {fix}")
    assert margins is not None
    bad = np.flatnonzero(~np.isfinite(margins))
    if bad.size:
        raise ArtifactError(f"{lib_path}: probe score at row {bad[0]} is {margins[bad[0]]}, not a finite number; {fix}")
    if expected is not None:
        _compare(lib_path, margins, expected, f"probe scores differ from {what}", fix)
    _compare(lib_path, outputs["margins_f32"], margins, "probe scores from float32 input differ from float64's", fix)
    single = outputs["single"]
    _compare(lib_path, single, margins[: len(single)], "probe scores of one-row calls differ from the batch's", fix)
    output = outputs["output"]
    bad = np.flatnonzero(~((output >= 0.0) & (output <= 1.0)))
    if bad.size:
        raise ArtifactError(f"{lib_path}: probe probability at row {bad[0]} is {output[bad[0]]}, outside [0, 1]; {fix}")


def _compare(lib_path: pathlib.Path, got: np.ndarray, want: np.ndarray, what: str, fix: str) -> None:
    bad = np.flatnonzero(~np.isclose(got, want, rtol=RTOL, atol=ATOL))
    if bad.size:
        i = int(bad[0])
        raise ArtifactError(
            f"{lib_path}: {what} at row {i} (library {got[i]!r}, expected {want[i]!r}; "
            f"{bad.size} of {len(want)} rows differ); {fix}"
        )
