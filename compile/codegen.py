"""Treelite model -> C sources (TL2cgen plus our batched entry point) -> shared library.

TL2cgen writes the trees as nested if/else, over quantized thresholds for
all but tiny models (exact: a threshold index compares like the threshold
itself).  We split its predict() so our entry point can run the trees unit
by unit over blocks of rows, and drive the C compiler ourselves so
translation units build in parallel and report progress."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import tl2cgen

from .errors import ModelFormatError
from .frontends import SourceModel

ENTRY_SOURCE = pathlib.Path(__file__).with_name("muse_entry.c")
DEFAULT_FLAGS = ("-O3", "-fPIC", "-std=c99", "-fno-semantic-interposition")
# Tree units are built for size, by measurement (500-tree model, tree blocking on, same process):
# batch 1 in 10 us against 27 us at -O3 and 30 us at -O2, batched 18.0 against 20.5 us/row.  The
# trees are branchy code far bigger than the instruction cache: smaller code is faster code.  The
# entry point's loops stay at -O3 (at -Os the one-tree model's batches ran 1.7x slower).
TREE_UNIT_FLAGS = ("-Os",)
# Measured on the 500-tree, 63-leaf, 100-feature model (bench/kernel.py), tree blocking on, at -O3:
# 2 trees per unit ran batch 1 in ~32 us against ~40 at 4 and ~50 at 8-16 (smaller functions
# optimise better); 64-row blocks ran batches at ~20 us/row against ~24 at 16-27 rows.
TREES_PER_UNIT = 2
BLOCK_ROWS = 64

Progress = Callable[[int, int], None]


def compiler() -> str:
    return os.environ.get("CC", "gcc")


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ModelFormatError(f"C compiler {compiler()!r} is not usable ({exc}); install gcc or set CC") from exc
    return out.stdout.splitlines()[0].strip()


def codegen_params(num_tree: int, num_feature: int) -> dict[str, int]:
    """Quantize thresholds only where it pays: it costs a binary search per
    feature per row and saved ~20 ns per tree per row on the 500-tree,
    100-feature model (59 -> 49 us per row before tree blocking), so tiny
    models skip it.  Trees go
    into units of TREES_PER_UNIT, each its own function (and translation
    unit, compiled in parallel); the entry point runs them unit by unit over
    blocks of rows."""
    units = max(1, min(256, num_tree // TREES_PER_UNIT))
    quantize = int(num_tree >= max(8, num_feature // 8))
    return {"quantize": quantize, "parallel_comp": units}


def generate_sources(source: SourceModel, workdir: pathlib.Path, params: dict[str, int]) -> list[pathlib.Path]:
    params = dict(params)
    if params.get("parallel_comp", 1) <= 1:
        params.pop("parallel_comp", None)  # TL2cgen rejects 1
    with _quiet_tl2cgen():
        tl2cgen.generate_c_code(source.model, workdir, params=params)
    for path in [*workdir.glob("*.c"), *workdir.glob("*.h")]:
        path.write_text(_separate_missing_flag(path.read_text()))
    quantize_c = workdir / "quantize.c"
    if quantize_c.exists():
        quantize_c.write_text(_exact_float_thresholds(quantize_c.read_text(), source))
    main = workdir / "main.c"
    if source.float32_base_margin is not None:
        main.write_text(_drop_base_scores(main.read_text()))
        for path in [main, *workdir.glob("tu*.c")]:
            path.write_text(_float_leaf_constants(path.read_text()))
    main.write_text(_add_block_entry(main.read_text()))
    shutil.copy(ENTRY_SOURCE, workdir / ENTRY_SOURCE.name)
    return sorted(workdir.glob("*.c"))


_THRESHOLD_TABLE = re.compile(r"(static const float threshold\[\] = \{\n)(.*?)(\n\};)", re.S)
_TH_LEN = re.compile(r"static const int th_len\[\] = \{(.*?)\};", re.S)


def _exact_float_thresholds(quantize_c: str, source: SourceModel) -> str:
    """Write a float32 model's quantization table with exact values.

    TL2cgen prints the table with std::numeric_limits<float>::digits10 + 2 = 8 significant
    digits (ArrayFormatter in its format_util.h), and 8 digits do not identify every float32:
    XGBoost's threshold -0.110694684 became -0.11069468, one ulp above it, so a row on the
    threshold went left where XGBoost goes right (issue 17).  Rows are quantized against this
    table, so every wrong entry moves a branch.  The table is rebuilt from the model (TL2cgen's
    own rule: per feature, the sorted distinct finite thresholds of numerical splits) and written
    as hexadecimal literals; each entry must print as TL2cgen printed it, or the tables are not
    the same.  float64 tables are printed with 17 digits, which round-trip: left alone."""
    match = _THRESHOLD_TABLE.search(quantize_c)
    if match is None:
        return quantize_c
    printed = [_unsigned_zero(t.strip()) for t in match.group(2).split(",") if t.strip()]
    th_len = _TH_LEN.search(quantize_c)
    lengths = [int(t) for t in th_len.group(1).split(",") if t.strip()] if th_len else None
    table = numerical_thresholds(source)
    exact = [v for feature in table for v in feature]
    if [len(f) for f in table] != lengths or [_unsigned_zero(f"{float(v):.8g}") for v in exact] != printed:
        raise ModelFormatError(
            "TL2cgen wrote a threshold table MUSE cannot match to the model's thresholds; "
            "this TL2cgen version is unsupported"
        )
    lines = [", ".join(_hex_float(v) for v in exact[i : i + 4]) + "," for i in range(0, len(exact), 4)]
    body = "\n".join(f"  {line}" for line in lines)
    return quantize_c[: match.start(2)] + body + quantize_c[match.end(2) :]


def _unsigned_zero(printed: str) -> str:
    # -0 and 0 are one threshold: which of them a table keeps depends on the order it met them.
    return "0" if printed == "-0" else printed


def numerical_thresholds(source: SourceModel) -> list[list[np.floating]]:
    """Per feature, the sorted distinct finite thresholds of the model's numerical splits, in
    the model's threshold type."""
    model = source.model
    per_feature: list[set] = [set() for _ in range(int(model.num_feature))]
    for i in range(int(model.num_tree)):
        tree = model.get_tree_accessor(i)
        numerical = tree.get_field("node_type") == _NUMERICAL_TEST_NODE
        for feature, threshold in zip(tree.get_field("split_index")[numerical], tree.get_field("threshold")[numerical]):
            if np.isfinite(threshold):
                per_feature[int(feature)].add(threshold)
    return [sorted(values) for values in per_feature]


_NUMERICAL_TEST_NODE = 1  # Treelite's TreeNodeType::kNumericalTestNode


def _hex_float(value: np.floating) -> str:
    """An exact C literal for a float32 value: a hexadecimal double constant, which a float
    holds exactly (-0x1.c567cap-4 for -0.110694684)."""
    mantissa, exponent = float(value).hex().split("p")
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}"


_BASE_SCORES = re.compile(r"(\n *// Apply base_scores\n)((?: *result\[\d+\] \+= [^;\n]+;\n)+)")


def _drop_base_scores(main_c: str) -> str:
    """XGBoost models: remove TL2cgen's final `result += base score`.  XGBoost starts every row
    at its base margin and adds the trees to it (float32, tree by tree); TL2cgen adds the trees
    to zero and the base score (a float64 literal, Treelite's float64 logit) last.  muse_entry.c
    starts result[] at MUSE_BASE_MARGIN instead, XGBoost's own value (frontends.xgboost_base_margin)."""
    new, count = _BASE_SCORES.subn(r"\1  /* muse: result[] starts at MUSE_BASE_MARGIN (muse_entry.c) */\n", main_c)
    if count == 0:
        raise ModelFormatError("TL2cgen produced no base score statement; this TL2cgen version is unsupported")
    return new


_LEAF = re.compile(r"^( *result\[\d+\] \+= )(-?(?:\d+\.?\d*(?:e[-+]?\d+)?));$", re.M)


def _float_leaf_constants(code: str) -> str:
    """`result[0] += 0.1;` -> `result[0] += 0.1f;`.  TL2cgen prints a float32 leaf as its
    shortest decimal, which identifies the float32 only when read as a float; as written it is a
    double constant, so `float += double` adds in float64 and rounds once, which is not XGBoost's
    float32 addition whenever the exact float sum is a tie (it often is).  A float constant
    makes the addition float + float."""
    new, count = _LEAF.subn(lambda m: m.group(1) + _float_literal(m.group(2)) + ";", code)
    if count != len(_ADDITION.findall(code)):
        raise ModelFormatError("TL2cgen wrote a leaf value MUSE cannot read; this TL2cgen version is unsupported")
    return new


_ADDITION = re.compile(r"^ *result\[\d+\] \+= [^;\n]*;$", re.M)


def _float_literal(decimal: str) -> str:
    if "." in decimal or "e" in decimal:
        return decimal + "f"
    return decimal + ".0f"  # "1" or "-0": an integer constant takes no f suffix


_PREDICT = re.compile(r"void predict\(struct Entry\* data, int pred_margin, (\w+)\* result\) \{\n(.*?)\n\}\n", re.S)
_UNIT_CALL = re.compile(r"^\s*predict_unit(\d+)\(data, result\);\s*$", re.M)


def _add_block_entry(main_c: str) -> str:
    """Split TL2cgen's predict() into the three parts a tree-blocked loop needs.

    predict() quantizes one row, runs every unit of trees on it, then adds base
    scores and applies the output transform.  muse_entry.c instead runs unit u
    over a block of rows before unit u+1, so each unit's code is fetched once per
    block rather than once per row (the idea lleaves uses; DESIGN.md section 6).
    The parts are TL2cgen's own statements, moved, so the arithmetic is unchanged;
    models small enough to have no units keep the one-row path."""
    match = _PREDICT.search(main_c)
    if match is None:
        return main_c
    units = [int(u) for u in _UNIT_CALL.findall(match.group(2))]
    if not units:
        return main_c
    result_type, body = match.group(1), match.group(2)
    first = _UNIT_CALL.search(body)
    assert first is not None  # findall found units in this same body
    last = list(_UNIT_CALL.finditer(body))[-1]
    prepare = body[: first.start()].replace("unsigned int tmp;", "")
    finish = body[last.end() :]
    table = ", ".join(f"predict_unit{u}" for u in units)
    return (
        main_c
        + f"""
/* Added by muse.compile.codegen: predict() in three parts, for tree blocking. */
void muse_prepare(struct Entry* data) {{
{prepare}
}}

void muse_finish(int pred_margin, {result_type}* result) {{
{finish}
}}

void (*const muse_units[])(struct Entry*, {result_type}*) = {{ {table} }};
const int muse_num_units = {len(units)};
"""
    )


@contextlib.contextmanager
def _quiet_tl2cgen():
    """TL2cgen's bundled Treelite writes to fd 2 that our newer Treelite wrote the
    model (harmless: parity tests cover it), and logs through print() and warnings.
    Errors still surface as exceptions carrying TL2cgen's own message."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _separate_missing_flag(code: str) -> str:
    """TL2cgen's `union Entry` overlays the missing flag (int -1) on the value's
    low 32 bits, so any double whose low word is 0xFFFFFFFF -- for example
    nextafter(-1.5, 0), a common LightGBM threshold -- is read as missing.
    A struct keeps flag and value apart; every access compiles unchanged."""
    code = code.replace("union Entry", "struct Entry")
    # qvalue beside the flag: 16-byte entries instead of 24, so a block of rows stays in cache.
    return code.replace("  double fvalue;\n  int qvalue;\n", "  int qvalue;\n  double fvalue;\n")


def result_type(workdir: pathlib.Path) -> str:
    """The C type predict() writes: float64 models write double, float32 ones float."""
    header = (workdir / "header.h").read_text()
    match = re.search(r"void predict\(struct Entry\* data, int pred_margin, (\w+)\* result\);", header)
    if not match:
        raise ModelFormatError(
            "TL2cgen produced an unexpected predict() signature; this TL2cgen version is unsupported"
        )
    return match.group(1)


def build_library(
    source: SourceModel,
    sources: list[pathlib.Path],
    output: pathlib.Path,
    flags: tuple[str, ...] = DEFAULT_FLAGS,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Compile every unit in parallel, then link; returns the full flag list used."""
    defines = [
        f"-DMUSE_NUM_FEATURE={source.model.num_feature}",
        f"-DMUSE_OUTPUT_WIDTH={source.output_width}",
        f"-DMUSE_OUTPUT_INDEX={source.output_index}",
        f"-DMUSE_RESULT_TYPE={result_type(sources[0].parent)}",
    ]
    if source.format == "lightgbm":
        defines.append("-DMUSE_LIGHTGBM_ZERO")
    if source.float32_inputs:
        defines.append("-DMUSE_FLOAT32_INPUTS")
    if source.float32_base_margin is not None:
        defines.append(f"-DMUSE_BASE_MARGIN={_hex_float(np.float32(source.float32_base_margin))}")
    if "muse_units[]" in (sources[0].parent / "main.c").read_text():
        defines += ["-DMUSE_BLOCKED", f"-DMUSE_BLOCK_ROWS={BLOCK_ROWS}"]
    all_flags = [*flags, *defines]
    jobs = jobs or os.cpu_count() or 1
    objects = [src.with_suffix(".o") for src in sources]

    compilers = _Compilers()

    def one(src: pathlib.Path, obj: pathlib.Path) -> None:
        extra = TREE_UNIT_FLAGS if _is_tree_unit(src) else ()
        compilers.run([compiler(), *all_flags, *extra, "-c", str(src), "-o", str(obj)], src)  # the last -O wins

    done = 0
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(one, s, o) for s, o in zip(sources, objects)]
        for fut in as_completed(futures):
            fut.result()
            done += 1
            if progress:
                progress(done, len(sources))
    except BaseException:
        # A failed unit, or Ctrl-C (KeyboardInterrupt) or an error from ``progress``: no unit
        # still queued starts, the compilers running stop, and nothing outlives this call.
        pool.shutdown(wait=False, cancel_futures=True)
        compilers.stop()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    _run([compiler(), "-shared", *flags, "-o", str(output), *map(str, objects), "-lm"], output)
    if any(_is_tree_unit(src) for src in sources):
        return [*all_flags, *(f"{f} (tree units)" for f in TREE_UNIT_FLAGS)]
    return all_flags


def _is_tree_unit(src: pathlib.Path) -> bool:
    return re.fullmatch(r"tu\d+\.c", src.name) is not None


def _run(cmd: list[str], subject: pathlib.Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    _check(proc.returncode, proc.stderr, subject)


def _check(returncode: int, stderr: str, subject: pathlib.Path) -> None:
    if returncode != 0:
        raise ModelFormatError(f"C compiler failed on {subject.name}: {stderr.strip()[-2000:]}")


class _Stopped(Exception):
    """A unit that was not compiled because the build stopped first."""


class _Compilers:
    """The compiler processes of one build.  Each runs in a session (so a process group) of its
    own: ``stop`` signals the group, which ends the processes the driver started too (gcc runs
    cc1 and as), and no unit starts after it.  Ctrl-C at a terminal reaches this process, not
    them; build_library stops them as the KeyboardInterrupt unwinds."""

    GRACE_SECONDS = 5.0  # after SIGTERM (the driver removes its temporary files), then SIGKILL

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()
        self._stopped = False

    def run(self, cmd: list[str], subject: pathlib.Path) -> None:
        with self._lock:
            if self._stopped:
                raise _Stopped(subject.name)
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            self._running.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with self._lock:
                self._running.discard(proc)
        _check(proc.returncode, stderr, subject)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.GRACE_SECONDS
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # the group's other members, even once the driver is gone


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
