"""Load a model library and score a probe batch, in a throwaway process.

Run by muse.compile.probe as ``python -I -S _probe_child.py LIBRARY NUM_FEATURE ROWS ABI``,
by path: nothing of MUSE, numpy or site-packages is imported (the standard library only,
~10 ms to start), and whatever the library does -- crash in a constructor, in predict, or
hang -- happens here, not in the process that asked.

Reads ROWS x NUM_FEATURE float64 values (native byte order, row-major) on stdin.  Writes a
report, one line per item, on what was stdout when it started:

    stage TEXT             about to do TEXT (so a crash can be attributed to it)
    error MESSAGE          a clean refusal (the process then exits with status 3)
    result NAME V1 V2 ...  scores, repr() of each float; NAME is one of
                           margins      muse_predict_f64, raw margins, all rows in one call
                           margins_f32  muse_predict_f32 on the same rows as float32
                           single       muse_predict_f64, raw margins, the first rows one call each
                           output       muse_predict_f64 with the output transform (probabilities)

File descriptor 1 is pointed at stderr before the library is loaded, so what the library
prints cannot corrupt the report.  The loading, symbol lookups and checks copy
_library.pyx's NativeLibrary, so the refusals read the same."""

import ctypes
import os
import sys

EXIT_REFUSED = 3
SINGLE_ROWS = 3  # rows also scored one per call: the batch-of-one path is separate C code


class Refused(Exception):
    """A clean refusal: the message names the library and what is wrong with it."""


def main() -> None:
    path, nfeat, nrow, abi_wanted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(kind: str, text: str) -> None:
        report.write(f"{kind} {text}\n")
        report.flush()

    try:
        probe(path, nfeat, nrow, abi_wanted, say)
    except Refused as exc:
        say("error", str(exc))
        sys.exit(EXIT_REFUSED)


def probe(path: str, nfeat: int, nrow: int, abi_wanted: int, say) -> None:
    data = sys.stdin.buffer.read()
    if len(data) != nrow * nfeat * 8:
        raise Refused(f"probe input has {len(data)} bytes, expected {nrow * nfeat * 8}")
    rows = (ctypes.c_double * (nrow * nfeat)).from_buffer_copy(data)

    say("stage", "loading")
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as exc:
        raise Refused(f"{path}: cannot load shared library: {exc}") from None

    def symbol(name, restype, argtypes):
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise Refused(f"{path}: not a MUSE model library (missing symbol {name})") from None
        fn.restype, fn.argtypes = restype, argtypes
        return fn

    say("stage", "reading its ABI version")
    abi = symbol("muse_abi_version", ctypes.c_int32, [])()
    if abi != abi_wanted:
        raise Refused(f"{path}: library ABI {abi} != {abi_wanted}; recompile the model")
    say("stage", "reading its feature count")
    have = symbol("muse_num_feature", ctypes.c_int32, [])()
    if have != nfeat:
        raise Refused(f"{path}: library has {have} features, manifest says {nfeat}")
    i64, i32, dbl = ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_double)
    f64 = symbol("muse_predict_f64", i32, [dbl, i64, i64, i32, dbl])
    f32 = symbol("muse_predict_f32", i32, [ctypes.POINTER(ctypes.c_float), i64, i64, i32, dbl])

    def call(fn, name, x, n, margin):
        out = (ctypes.c_double * n)()
        rc = fn(x, n, nfeat, margin, out)
        if rc != 0:
            raise Refused(f"{path}: {name} failed with code {rc} on the probe batch")
        return list(out)

    say("stage", "scoring the probe batch")
    say("result", " ".join(["margins", *map(repr, call(f64, "muse_predict_f64", rows, nrow, 1))]))
    rows32 = (ctypes.c_float * (nrow * nfeat))(*rows)
    say("result", " ".join(["margins_f32", *map(repr, call(f32, "muse_predict_f32", rows32, nrow, 1))]))
    single = []
    for i in range(min(SINGLE_ROWS, nrow)):
        one = (ctypes.c_double * nfeat).from_buffer_copy(data, i * nfeat * 8)
        single += call(f64, "muse_predict_f64", one, 1, 1)
    say("result", " ".join(["single", *map(repr, single)]))
    say("result", " ".join(["output", *map(repr, call(f64, "muse_predict_f64", rows, nrow, 0))]))
    say("stage", "done")


if __name__ == "__main__":
    main()
