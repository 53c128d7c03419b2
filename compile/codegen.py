"""Treelite model -> C sources -> shared library, by one of two generators.

The predicated generator (``generate_forest``, the default for LightGBM and XGBoost models with
numerical splits) writes every tree as node arrays that muse_entry.c walks without branches,
several rows or trees side by side.  Measured on the fraud-shaped model (500 trees x 63 leaves x
100 features, one thread, distinct rows, bench/kernel.py): ~0.5x lleaves' time per row at batch
4096 and at batch 1, where the if/else trees ran at ~1.3x (batch 4096) and ~0.9x (batch 1); it
compiles in seconds instead of most of a minute.

The if/else generator is the fallback, for what the node arrays do not express (scikit-learn
models, categorical splits, vector leaves, other postprocessors) and on request (MUSE_CODEGEN=
ifelse): TL2cgen writes the trees as nested if/else, over quantized thresholds for all but tiny
models (exact: a threshold index compares like the threshold itself).  We split its predict() so
our entry point can run the trees unit by unit over blocks of rows, and drive the C compiler
ourselves so translation units build in parallel and report progress."""

from __future__ import annotations

import collections
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
import treelite

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


GENERATORS = ("predicated", "ifelse")


def generate_sources(
    source: SourceModel, workdir: pathlib.Path, params: dict[str, int], generator: str | None = None
) -> list[pathlib.Path]:
    """The C sources of ``source`` in ``workdir``.  ``generator``: "predicated" (the default, or
    $MUSE_CODEGEN) falls back to "ifelse" where the model needs it.  The choice is recorded in
    ``params`` (the manifest's codegen_params): {"predicated": 1, "tree_group": 8} replaces the
    if/else generator's TL2cgen parameters."""
    generator = generator or os.environ.get("MUSE_CODEGEN") or "predicated"
    if generator not in GENERATORS:
        raise ModelFormatError(f"unknown code generator {generator!r}; expected one of {', '.join(GENERATORS)}")
    if generator == "predicated":
        try:
            generate_forest(source, workdir)
        except Unsupported:
            pass
        else:
            shutil.copy(ENTRY_SOURCE, workdir / ENTRY_SOURCE.name)
            params.clear()
            params.update({"predicated": 1, "tree_group": TREE_GROUP})
            return [workdir / ENTRY_SOURCE.name]
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


# --- the predicated generator ------------------------------------------------------------------------

_LT, _LE, _GT, _GE = 2, 3, 4, 5  # Treelite's Operator enum
_NEGATE = {_LE: _GT, _LT: _GE, _GE: _LT, _GT: _LE}
_X, _NEG_X, _NOT_NAN = 0, 1, 2  # what a column holds: x, -x, or 0 where x is a number (NaN where not)
TREE_GROUP = 8  # trees walked side by side for one row: muse_entry.c's MUSE_TREE_GROUP


class Unsupported(Exception):
    """The model needs the if/else generator."""


def _below(t: float, dt: type) -> np.floating | None:
    """The largest dt value < t, or None when there is none (t is -inf)."""
    with np.errstate(over="ignore"):  # past float32's range: an infinity, the right answer
        c = dt(t)
        if c < t:
            return c
        return None if c == -np.inf else np.nextafter(c, dt(-np.inf))  # below -max: -inf, rightly


def _at_or_below(t: float, dt: type) -> np.floating:
    """The largest dt value <= t."""
    with np.errstate(over="ignore"):
        c = dt(t)
        return c if c <= t else np.nextafter(c, dt(-np.inf))


def _greater_form(op: int, threshold: float, dt: type) -> tuple[int, np.floating]:
    """`x op threshold`, for any x of type dt but NaN, as `column > a`: (what the column holds, a).
    x > t is x > (the largest dt <= t) and x >= t is x > (the largest dt < t), exactly, because
    x is a dt; x < t and x <= t are the same on -x.  Only x >= -inf (and x <= inf) has no such
    form: it holds for every number, so it reads a column that is 0 for numbers and NaN for NaN."""
    threshold = np.float64(threshold)  # a Python float would compare with a float32 as a float32
    if op == _GT:
        return _X, _at_or_below(threshold, dt)
    if op == _LT:
        return _NEG_X, _at_or_below(-threshold, dt)
    if op in (_GE, _LE):
        kind, t = (_X, threshold) if op == _GE else (_NEG_X, -threshold)
        a = _below(t, dt)
        return (kind, a) if a is not None else (_NOT_NAN, dt(-1))
    raise Unsupported(f"comparison operator {op}")


def forest_layout(model: treelite.Model) -> tuple[list[tuple], list[float], list[int], list[int]]:
    """Every tree as nodes (feature, operator, threshold, first child), children of a node side by
    side with the default child first (a NaN compares false and takes it), and leaves that loop to
    themselves (feature -1); their values; each tree's root and depth.  Node 0 is a leaf of value 0
    for the walks that pad a group of trees."""
    nodes: list[tuple] = [(-1, 0, 0.0, 0)]
    values: list[float] = [0.0]
    roots: list[int] = []
    depths: list[int] = []
    for ti in range(int(model.num_tree)):
        tree = model.get_tree_accessor(ti)
        node_type = tree.get_field("node_type")
        if np.any((node_type != _LEAF_NODE) & (node_type != _NUMERICAL_TEST_NODE)):
            raise Unsupported("categorical splits")
        if len(tree.get_field("leaf_vector")):
            raise Unsupported("vector leaves")
        left, right = tree.get_field("cleft"), tree.get_field("cright")
        feature, default_left = tree.get_field("split_index"), tree.get_field("default_left")
        threshold, op, leaf = tree.get_field("threshold"), tree.get_field("cmp"), tree.get_field("leaf_value")
        base = len(nodes)
        ids, depth, queue = {0: base}, {0: 0}, collections.deque([0])
        split: dict[int, tuple] = {}
        following = base + 1
        while queue:
            n = queue.popleft()
            if left[n] == -1:
                continue
            if np.isnan(threshold[n]):
                raise Unsupported("a NaN threshold")
            # The second child is taken when `x op t` holds (default right) or fails (default left).
            o = int(op[n])
            if default_left[n]:
                first, second, o = int(left[n]), int(right[n]), _NEGATE.get(o, -1)
            else:
                first, second = int(right[n]), int(left[n])
            split[n] = (int(feature[n]), o, threshold[n], following)
            ids[first], ids[second] = following, following + 1
            depth[first] = depth[second] = depth[n] + 1
            following += 2
            queue += [first, second]
        nodes += [()] * (following - base)
        values += [0.0] * (following - base)
        for old, new in ids.items():
            if left[old] == -1:
                nodes[new] = (-1, 0, 0.0, new)
                values[new] = leaf[old]
            else:
                nodes[new] = split[old]
        roots.append(base)
        depths.append(max(depth.values()))
    return nodes, values, roots, depths


_LEAF_NODE = 0  # Treelite's TreeNodeType::kLeafNode
# A walk takes its tree's full depth in steps, whatever the row's path.  On the fraud-shaped model
# (bench/kernel.py) a step costs ~1 ns at batch 4096 and an if/else node on the paths training
# rows take ~6.4 ns: the if/else trees would win once the depths summed over trees exceed ~6x the
# mean path (training rows, weighted by leaf counts).  LightGBM's leaf-wise trees measured ~2x
# (63 and 255 leaves), where the walk was 2.4-6x faster; only chain-like trees reach the limit.
WALK_WASTE_LIMIT = 6.0


def expected_path_length(model: treelite.Model) -> float:
    """The sum over trees of the mean depth of the leaves training rows reached, weighted by the
    rows (or hessians) each leaf held where the model kept them, else unweighted."""
    total = 0.0
    for ti in range(int(model.num_tree)):
        tree = model.get_tree_accessor(ti)
        left, right = tree.get_field("cleft"), tree.get_field("cright")
        weight = np.ones(len(left))
        for field in ("data_count", "sum_hess"):
            present = tree.get_field(f"{field}_present")
            if len(present) == len(left) and np.all(present):
                weight = tree.get_field(field).astype(np.float64)
                break
        depth = np.zeros(len(left))
        reached = np.zeros(len(left), dtype=bool)
        stack = [0]
        while stack:
            n = stack.pop()
            reached[n] = True
            if left[n] != -1:
                depth[left[n]] = depth[right[n]] = depth[n] + 1
                stack += [int(left[n]), int(right[n])]
        leaves = reached & (left == -1)
        total += float(np.average(depth[leaves], weights=weight[leaves])) if weight[leaves].sum() > 0 else 0.0
    return total


def generate_forest(source: SourceModel, workdir: pathlib.Path) -> pathlib.Path:
    """forest.h, the node arrays and column fillers of muse_entry.c's predicated walk, or raise
    Unsupported.  LightGBM compares float64 inputs as float64 and XGBoost rounds them to float32,
    so float32 thresholds serve float32 inputs (and every XGBoost input) and, for LightGBM,
    float64 thresholds float64 inputs; the leaves are added in the model's leaf type."""
    model = source.model
    header = model.get_header_accessor()
    if source.format not in ("lightgbm", "xgboost"):
        raise Unsupported(f"{source.format} models")
    if str(header.get_field("postprocessor")) != "sigmoid" or source.output_width != 1:
        raise Unsupported("not a sigmoid binary classifier")
    if int(header.get_field("average_tree_output")[0]) or int(model.num_tree) < 1:
        raise Unsupported("averaged trees")
    leaf_type = np.float32 if model.get_tree_accessor(0).get_field("leaf_value").dtype == np.float32 else np.float64
    if source.float32_base_margin is None and np.any(header.get_field("base_scores") != 0):
        raise Unsupported("a base score")  # LightGBM keeps it in the trees; TL2cgen adds it last
    nodes, values, roots, depths = forest_layout(model)
    if sum(depths) > WALK_WASTE_LIMIT * expected_path_length(model):
        raise Unsupported("trees far deeper than the paths rows take")
    # The columns: x, -x or "is a number" of the features splits read, then one of zeros for the leaves.
    pairs = sorted({(f, _greater_form(o, t, np.float32)[0]) for f, o, t, _ in nodes if f >= 0})
    col_of = {p: k for k, p in enumerate(pairs)}
    zero = len(pairs)
    double_rows = not source.float32_inputs
    types = [np.float32, np.float64] if double_rows else [np.float32]
    cols, firsts = [], []
    thresholds: dict[type, list] = {dt: [] for dt in types}
    for f, o, t, first in nodes:
        firsts.append(first)
        cols.append(zero if f < 0 else col_of[(f, _greater_form(o, t, np.float32)[0])])
        for dt in types:
            thresholds[dt].append(dt(0) if f < 0 else _greater_form(o, t, dt)[1])
    order = sorted(range(len(roots)), key=lambda t: depths[t])  # similar depths side by side
    groups = [order[i : i + TREE_GROUP] for i in range(0, len(order), TREE_GROUP)]
    groups[-1] += [len(roots)] * (TREE_GROUP - len(groups[-1]))  # padding: muse_root[ntree] is node 0
    leaf_c = "float" if leaf_type == np.float32 else "double"
    out = [
        f"/* Generated by muse.compile.codegen: {len(roots)} trees as node arrays for the predicated walk in\n"
        " * muse_entry.c.  Node i goes to muse_first[i] + (xt[muse_col[i]] > muse_a[i]); a leaf reads the\n"
        " * column of zeros against 0 and stays. */\n",
        f"#define MUSE_NCOL {zero + 1}\n#define MUSE_NTREE {len(roots)}\n#define MUSE_NGROUP {len(groups)}\n",
        f"#define MUSE_TREE_GROUP {TREE_GROUP}\n#define MUSE_LEAF_TYPE {leaf_c}\n",
        f"#define MUSE_EXP {'expf' if leaf_type == np.float32 else 'exp'}\n",
        f"#define MUSE_SIGMOID_ALPHA {_c_float(float(header.get_field('sigmoid_alpha')[0]), np.float64)}\n",
    ]
    if double_rows:
        out.append("#define MUSE_DOUBLE_ROWS\n")
    for dt, name in ((np.float32, "muse_a32"), (np.float64, "muse_a64")):
        if dt in thresholds:
            out.append(
                _c_array(
                    f"static const {'float' if dt == np.float32 else 'double'}",
                    name,
                    [_c_float(v, dt) for v in thresholds[dt]],
                )
            )
    out += [
        _c_array("static const uint32_t", "muse_col", [str(c) for c in cols]),
        _c_array("static const uint32_t", "muse_first", [str(f) for f in firsts]),
        _c_array("static const MUSE_LEAF_TYPE", "muse_leaf", [_c_float(leaf_type(v), leaf_type) for v in values]),
        _c_array("static const uint32_t", "muse_root", [str(r) for r in [*roots, 0]]),
        _c_array("static const uint32_t", "muse_depth", [str(d) for d in depths]),
        _c_array("static const uint32_t", "muse_group_tree", [str(t) for g in groups for t in g]),
        _c_array(
            "static const uint32_t",
            "muse_group_depth",
            [str(max(depths[t] for t in g if t < len(roots))) for g in groups],
        ),
    ]
    readers = [("f32", "float", "float", "MUSE_IN32(x[{f}])")]
    readers.append(
        ("f64", "double", "double", "MUSE_IN64(x[{f}])")
        if double_rows
        else ("f64", "double", "float", "MUSE_IN32((float)x[{f}])")
    )
    for suffix, in_type, xt_type, read in readers:
        out.append(f"static inline void muse_columns_{suffix}(const {in_type}* x, {xt_type}* xt) {{\n  {xt_type} v;\n")
        for f in sorted({f for f, _ in pairs}):
            out.append(f"  v = {read.format(f=f)};")
            for kind, expr in ((_X, "v"), (_NEG_X, "-v"), (_NOT_NAN, "v == v ? 0 : v")):
                if (f, kind) in col_of:
                    out.append(f" xt[{col_of[(f, kind)]}] = {expr};")
            out.append("\n")
        out.append(f"  xt[{zero}] = 0;\n}}\n")
    path = workdir / "forest.h"
    path.write_text("".join(out))
    return path


def _c_float(value: float | np.floating, dt: type) -> str:
    """An exact C literal of a float32 (dt np.float32: with an f suffix) or float64 value."""
    v = float(value)
    if np.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    return _hex_float(np.float64(v)) + ("f" if dt == np.float32 else "")


def _c_array(decl: str, name: str, items: list[str]) -> str:
    lines = [", ".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    return f"{decl} {name}[{len(items)}] = {{\n  " + ",\n  ".join(lines) + "\n};\n"


# --- building ----------------------------------------------------------------------------------------


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
    predicated = (sources[0].parent / "forest.h").exists()
    defines = [
        f"-DMUSE_NUM_FEATURE={source.model.num_feature}",
        f"-DMUSE_OUTPUT_WIDTH={source.output_width}",
        f"-DMUSE_OUTPUT_INDEX={source.output_index}",
        "-DMUSE_PREDICATED" if predicated else f"-DMUSE_RESULT_TYPE={result_type(sources[0].parent)}",
    ]
    if source.format == "lightgbm":
        defines.append("-DMUSE_LIGHTGBM_ZERO")
    if source.float32_inputs:
        defines.append("-DMUSE_FLOAT32_INPUTS")
    if source.float32_base_margin is not None:
        defines.append(f"-DMUSE_BASE_MARGIN={_hex_float(np.float32(source.float32_base_margin))}")
    if not predicated and "muse_units[]" in (sources[0].parent / "main.c").read_text():
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
