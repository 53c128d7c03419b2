"""Native predict benchmark: muse against its peers on the same model and the same rows.

    python -m muse.bench.kernel [--workdir DIR] [--rounds N] [--models fraud,small,one]

Engines, one thread each, all fed the same float32 batches of distinct rows (a different batch
on every call, from a pool of 32,768 rows the models were not trained on):

- muse: the compiled library through ``CompiledModel.predict`` (the predicated generator), and
  the same model forced to the if/else generator (MUSE_CODEGEN=ifelse, TL2cgen's trees);
- lleaves, in a virtual environment of its own (it pins an older llvmlite than Numba's), both
  through its ``predict`` and through its compiled entry point, linked into a library and called
  here with ctypes on float64 copies of the batches (the copy is not timed); the ctypes call's
  own cost is reported as a row of its own (``ctypes call, 0 rows``);
- ONNX Runtime (the model converted by onnxmltools), in a virtual environment of its own;
- TL2cgen's stock code with quantized thresholds (``tl2cgen.Predictor``, DMatrix built untimed);
- LightGBM's ``Booster.predict``.

A peer whose environment cannot be built is reported as such.  Engines in other environments
run in worker processes that time their own calls; every round times each engine in turn, so
all engines see the same load, and medians over rounds are reported.  Each engine's agreement
with LightGBM is checked on random rows and on rows forced onto the model's thresholds (and one
float32 ulp either side), before timing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from muse.bench.models import fraud_like_matrix, train_lightgbm
from muse.bench.timing import print_table
from muse.compile import build_artifact, load_artifact

BATCHES = (1, 16, 256, 4096)
POOL_ROWS = 8 * 4096
MODELS = {"fraud": ("fraud 500x63", 500, 63), "small": ("small 50x15", 50, 15), "one": ("one tree", 1, 63)}
# Calls per sample: each sample is a mean over this many calls on consecutive distinct batches.
CALLS = {1: 200, 16: 40, 256: 4, 4096: 1}
PEERS = {
    # lleaves 1.3 builds with llvmlite's legacy pass manager, gone from llvmlite 0.45.
    "lleaves": ["lleaves", "llvmlite<0.45", "numpy"],
    "onnxruntime": ["onnxruntime", "onnxmltools", "onnx", "lightgbm", "numpy"],
}

WORKER = r"""
import json, sys, time
import numpy as np
kind, model_path, pool_path, cache = sys.argv[1:5]
pool = np.load(pool_path)
t0 = time.perf_counter()
if kind == "lleaves":
    import lleaves
    model = lleaves.Model(model_file=model_path)
    model.compile(cache=cache)
    version = lleaves.__version__ if hasattr(lleaves, "__version__") else ""
    def predict(X):
        return model.predict(X, n_jobs=1)
else:
    import lightgbm, onnxmltools, onnxruntime
    from onnxmltools.convert.common.data_types import FloatTensorType
    booster = lightgbm.Booster(model_file=model_path)
    onx = onnxmltools.convert_lightgbm(
        booster, initial_types=[("input", FloatTensorType([None, pool.shape[1]]))], zipmap=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onx.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    output = [o.name for o in session.get_outputs()][-1]
    version = onnxruntime.__version__
    def predict(X):
        return session.run([output], {feed: X})[0][:, 1]
print(json.dumps({"compile_s": time.perf_counter() - t0, "version": version}), flush=True)
batches = {}
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "time":
        b, start, calls = cmd["batch"], cmd["start"], cmd["calls"]
        if b not in batches:
            batches[b] = [np.ascontiguousarray(pool[i : i + b]) for i in range(0, len(pool) - b + 1, b)]
        todo = [batches[b][(start + i) % len(batches[b])] for i in range(calls)]
        t = time.perf_counter_ns()
        for X in todo:
            predict(X)
        print(json.dumps({"ns": (time.perf_counter_ns() - t) / calls}), flush=True)
    else:
        np.save(cmd["out"], np.asarray(predict(np.load(cmd["path"])), dtype=np.float64))
        print(json.dumps({"ok": 1}), flush=True)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", default="fraud,small,one")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    pool = np.ascontiguousarray(fraud_like_matrix(POOL_ROWS, seed=7)[0], dtype=np.float32)
    pool_path = args.workdir / "kernel_pool.npy"
    np.save(pool_path, pool)
    peers = {name: peer_python(args.workdir / "venvs" / name, packages) for name, packages in PEERS.items()}
    times, notes = [], []
    for key in args.models.split(","):
        label, trees, leaves = MODELS[key]
        path = train_lightgbm(args.workdir / f"{key}_{trees}x{leaves}.txt", trees=trees, leaves=leaves)
        with tempfile.TemporaryDirectory() as tmp:
            engines, compile_s, agreement = setup_engines(path, pool, pool_path, pathlib.Path(tmp), peers, args)
            for batch in BATCHES:
                medians = measure(engines, pool, batch, args.rounds)
                times.append((label, batch, medians))
                print(f"{label} batch {batch}: " + ", ".join(f"{k} {v:,.0f}" for k, v in medians.items()), flush=True)
            notes.append((label, compile_s, agreement))
            for engine in engines.values():
                engine.close()
    report(times, notes, peers)


# --- engines -----------------------------------------------------------------------------------------


class Engine:
    """Times ``calls`` calls on consecutive distinct batches of one size: mean ns per call."""

    def __init__(self, time_calls: Callable[[int, int, int], float], predict: Callable[[np.ndarray], np.ndarray]):
        self.time_calls = time_calls
        self.predict = predict

    def close(self) -> None:
        pass


class LocalEngine(Engine):
    """An engine in this process: ``call`` takes what ``prepare`` (untimed) made of a batch."""

    def __init__(
        self,
        call: Callable[[Any], object],
        pool: np.ndarray,
        prepare: Callable[[np.ndarray], Any] = lambda X: X,
        predict: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.call, self.pool, self.prepare = call, pool, prepare
        self.batches: dict[int, list] = {}
        super().__init__(self._time, predict or (lambda X: np.asarray(call(prepare(X)), dtype=np.float64)))

    def _time(self, batch: int, start: int, calls: int) -> float:
        if batch not in self.batches:
            rows = range(0, len(self.pool) - batch + 1, batch)
            self.batches[batch] = [self.prepare(np.ascontiguousarray(self.pool[i : i + batch])) for i in rows]
        todo = [self.batches[batch][(start + i) % len(self.batches[batch])] for i in range(calls)]
        call = self.call
        t = time.perf_counter_ns()
        for X in todo:
            call(X)
        return (time.perf_counter_ns() - t) / calls


class WorkerEngine(Engine):
    """An engine in a worker process of a peer's own environment."""

    def __init__(self, python: str, kind: str, model: pathlib.Path, pool_path: pathlib.Path, cache: pathlib.Path):
        script = cache.with_name("peer_worker.py")
        script.write_text(WORKER)
        self.proc = subprocess.Popen(
            [python, str(script), kind, str(model), str(pool_path), str(cache)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._read()
        self.tmp = cache.parent
        super().__init__(self._time, self._predict)

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker exited with {self.proc.wait()}")
        return json.loads(line)

    def _send(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _time(self, batch: int, start: int, calls: int) -> float:
        return float(self._send({"op": "time", "batch": batch, "start": start, "calls": calls})["ns"])

    def _predict(self, X: np.ndarray) -> np.ndarray:
        src, out = self.tmp / "worker_in.npy", self.tmp / "worker_out.npy"
        np.save(src, X)
        self._send({"op": "predict", "path": str(src), "out": str(out)})
        return np.load(out)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def peer_python(venv: pathlib.Path, packages: list[str]) -> str:
    """The python of ``venv`` with ``packages`` installed (made on first use), or a reason why not."""
    python = venv / "bin" / "python"
    marker = venv / ".muse-bench-ready"
    if marker.exists():
        return str(python)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True, text=True
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()
        return "not installable: " + (tail[-1] if tail else f"exit {exc.returncode}")
    marker.write_text(" ".join(packages) + "\n")
    return str(python)


def setup_engines(path, pool, pool_path, tmp: pathlib.Path, peers: dict[str, str], args):
    """Build every engine for the model at ``path``: (engines, compile seconds, agreement rows)."""
    import lightgbm as lgb
    import tl2cgen
    import treelite

    engines: dict[str, Engine] = {}
    compile_s: dict[str, float | str] = {}
    t0 = time.perf_counter()
    muse = load_artifact(build_artifact(path, tmp / "registry", name="bench"))
    compile_s["muse"] = time.perf_counter() - t0
    engines["muse"] = LocalEngine(muse.predict, pool)
    os.environ["MUSE_CODEGEN"] = "ifelse"
    try:
        t0 = time.perf_counter()
        ifelse = load_artifact(build_artifact(path, tmp / "registry", name="ifelse"))
        compile_s["muse if/else"] = time.perf_counter() - t0
    finally:
        del os.environ["MUSE_CODEGEN"]
    engines["muse if/else"] = LocalEngine(ifelse.predict, pool)

    python = peers["lleaves"]
    if python.startswith("not installable"):
        compile_s["lleaves"] = python
    else:
        cache = args.workdir / f"lleaves_{path.stem}.o"  # lleaves reuses a cached object: time its first build
        fresh = not cache.exists()
        worker = WorkerEngine(python, "lleaves", path, pool_path, cache)
        compile_s["lleaves"] = worker.ready["compile_s"] if fresh else "cached"
        engines["lleaves"] = worker
        library = tmp / "lleaves_direct.so"
        subprocess.run(["gcc", "-shared", "-o", str(library), str(cache), "-lm"], check=True)
        entry = ctypes.CDLL(str(library)).forest_root
        entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
        out = np.empty(max(BATCHES))
        out_ptr = out.ctypes.data

        def direct(X: np.ndarray) -> np.ndarray:
            X = np.ascontiguousarray(X, dtype=np.float64)
            entry(X.ctypes.data, out_ptr, 0, len(X))
            return out[: len(X)].copy()

        def prepared(X):  # float64, as the entry point reads; the pointer taken once, untimed
            X = np.ascontiguousarray(X, dtype=np.float64)
            return _Pointer(X)

        engines["lleaves direct"] = LocalEngine(
            lambda p: entry(p.ptr, out_ptr, 0, p.n), pool, prepare=prepared, predict=direct
        )
        engines["ctypes call, 0 rows"] = LocalEngine(lambda p: entry(p.ptr, out_ptr, 0, 0), pool, prepare=prepared)

    python = peers["onnxruntime"]
    if python.startswith("not installable"):
        compile_s["onnxruntime"] = python
    else:
        worker = WorkerEngine(python, "onnxruntime", path, pool_path, tmp / "onnx.cache")
        compile_s["onnxruntime"] = worker.ready["compile_s"]
        engines["onnxruntime"] = worker

    t0 = time.perf_counter()
    tl_lib = tmp / "tl2cgen_stock.so"
    tl2cgen.export_lib(
        treelite.frontend.load_lightgbm_model(path), "gcc", tl_lib, params={"quantize": 1}, nthread=os.cpu_count()
    )
    compile_s["tl2cgen"] = time.perf_counter() - t0
    tl_pred = tl2cgen.Predictor(tl_lib, nthread=1)
    engines["tl2cgen"] = LocalEngine(
        lambda d: tl_pred.predict(d), pool, prepare=tl2cgen.DMatrix, predict=lambda X: tl_out(tl_pred, X)
    )
    booster = lgb.Booster(model_file=str(path), params={"num_threads": 1})
    engines["lightgbm"] = LocalEngine(lambda X: booster.predict(X, num_threads=1), pool)

    agreement = {}
    random_rows = pool[:4096]
    threshold_rows = on_threshold_rows(path, 4096)
    for name, engine in engines.items():
        if name == "ctypes call, 0 rows":
            continue
        agreement[name] = [
            disagree(engine.predict(X), np.asarray(booster.predict(X))) for X in (random_rows, threshold_rows)
        ]
    return engines, compile_s, agreement


class _Pointer:
    """A float64 batch and its address, for a ctypes call that converts nothing."""

    def __init__(self, X: np.ndarray):
        self.X, self.ptr, self.n = X, X.ctypes.data, len(X)


def tl_out(predictor, X: np.ndarray) -> np.ndarray:
    import tl2cgen

    return np.asarray(predictor.predict(tl2cgen.DMatrix(X)), dtype=np.float64).reshape(len(X), -1)[:, -1]


def on_threshold_rows(path: pathlib.Path, rows: int, seed: int = 3) -> np.ndarray:
    """float32 rows whose values sit on the model's thresholds or one float32 ulp either side."""
    import treelite

    model = treelite.frontend.load_lightgbm_model(path)
    per_feature: list[list[float]] = [[] for _ in range(int(model.num_feature))]
    for i in range(int(model.num_tree)):
        tree = model.get_tree_accessor(i)
        for f, t, kind in zip(tree.get_field("split_index"), tree.get_field("threshold"), tree.get_field("node_type")):
            if kind == 1 and np.isfinite(t):
                per_feature[f].append(float(t))
    rng = np.random.default_rng(seed)
    X = fraud_like_matrix(rows, features=len(per_feature), seed=seed + 100)[0].astype(np.float32)
    for j, values in enumerate(per_feature):
        if values:
            t = np.array(values, dtype=np.float32)[rng.integers(0, len(values), rows)]
            step = rng.integers(-1, 2, rows)
            near = np.where(step < 0, np.nextafter(t, np.float32(-np.inf)), t)
            near = np.where(step > 0, np.nextafter(t, np.float32(np.inf)), near)
            X[:, j] = np.where(rng.random(rows) < 0.7, near, X[:, j])
    return X


def disagree(got: np.ndarray, want: np.ndarray) -> str:
    diff = np.abs(np.asarray(got, dtype=np.float64).ravel() - want)
    bad = int(np.sum(~(diff <= 1e-12)))
    return f"{bad} rows (max {np.max(diff):.1g})" if bad else f"all (max {np.max(diff):.1g})"


def measure(engines: dict[str, Engine], pool: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """Median ns per row of each engine: every round times each engine in turn."""
    calls = CALLS[batch]
    samples: dict[str, list[float]] = {name: [] for name in engines}
    start = 0
    for r in range(rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            ns = engine.time_calls(batch, start, calls)
            if r:
                samples[name].append(ns / batch)
        start += calls
    return {name: statistics.median(s) for name, s in samples.items()}


# --- report ------------------------------------------------------------------------------------------


def report(times, notes, peers: dict[str, str]) -> None:
    engines = list(times[0][2]) if times else []
    print()
    print("ns per row (median); batch 1 is ns per call")
    print_table(["model", "batch", *engines], [[m, b, *(f"{t[e]:,.0f}" for e in engines)] for m, b, t in times])
    print()
    others = [e for e in engines if e not in ("muse", "ctypes call, 0 rows")]
    print("muse's time per row as a fraction of each engine's (same run)")
    ratios = [[m, b, *(f"{t['muse'] / t[e]:.2f}" for e in others)] for m, b, t in times]
    print_table(["model", "batch", *others], ratios)
    print()
    print("agreement with LightGBM's probabilities (|diff| <= 1e-12): random rows / on-threshold rows; compile s")
    rows = []
    for label, compile_s, agreement in notes:
        for name in agreement:
            c = compile_s.get(name, "")
            rows.append([label, name, *agreement[name], f"{c:.1f}" if isinstance(c, float) else c])
        for name, c in compile_s.items():
            if name not in agreement:
                rows.append([label, name, "-", "-", c])
    print_table(["model", "engine", "random rows", "on-threshold rows", "compile s"], rows)
    for name, python in peers.items():
        if python.startswith("not installable"):
            print(f"{name}: {python}")


if __name__ == "__main__":
    main()
