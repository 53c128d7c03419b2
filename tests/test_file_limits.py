"""The files MUSE reads besides deployments and calibrations: references and model manifests
are parsed within the document limits (muse.calib.names), so a deeply nested one is an error
naming the file and the limit, never a RecursionError; a model that cannot be read refuses its
deployment by name; and a `muse compile` that is interrupted stops its compilers."""

from __future__ import annotations

import errno
import os
import pathlib
import re
import select

import msgspec
import pytest
from helpers import CURVE, make_registry

from muse.calib import ReferenceError, load_reference
from muse.calib.names import MAX_DEPTH, MAX_ELEMENTS, LimitError
from muse.calib.reference import ReferenceFile, encode_reference
from muse.compile import ArtifactError, codegen, load_artifact
from muse.compile import artifact as artifact_module
from muse.compile.frontends import load_source_model
from muse.compile.manifest import MANIFEST_FILE, Manifest, Probe, read_manifest, write_manifest
from muse.core.deploy import DeploymentStore
from muse.core.snapshot import ModelPool, build_snapshot
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError

DEEP = 10_000
LIMIT = f"nested deeper than {MAX_DEPTH} levels"


def nested(depth: int) -> str:
    """``depth`` levels of arrays: JSON and TOML alike."""
    return "[" * depth + "]" * depth


# -- references ------------------------------------------------------------------------------


def _reference_text(toml: bool, depth: int, where: str) -> str:
    """A reference file with ``depth`` levels of nesting in its document at ``where``."""
    if toml:
        good = encode_reference(ReferenceFile("fraud", CURVE)).decode()
        inner = nested(depth - 1)  # the document is the first level
        if where == "edges":
            return good.replace("edges = [", f"edges = [{nested(depth - 3)}, ", 1)
        return f"{where} = {inner}\n{good}"
    doc = msgspec.json.decode(encode_reference(ReferenceFile("fraud", CURVE), toml=False))
    body = msgspec.json.encode(doc).decode()
    if where == "edges":
        return body.replace('"edges":[', f'"edges":[{nested(depth - 3)},', 1)
    return "{" + f'"{where}": {nested(depth - 1)}, ' + body[1:]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("where", ["description", "extra", "edges"])
def test_deep_reference_files_name_the_file_and_the_limit(tmp_path, suffix, where):
    path = tmp_path / f"deep{suffix}"
    path.write_text(_reference_text(suffix == ".toml", DEEP, where))
    with pytest.raises(ReferenceError, match=f"^{re.escape(str(path))}: {LIMIT}") as info:
        load_reference(str(path))  # directly: not only through Registry.load_reference
    assert "muse.calib.names.MAX_DEPTH" in str(info.value)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_references_at_the_depth_limit_are_read_past_it(tmp_path, suffix):
    """MAX_DEPTH levels are within the limit: the reference's own rules judge the file (no
    reference nests that deep, so they refuse it); one level more is the limit's refusal."""
    path = tmp_path / f"ref{suffix}"
    path.write_text(_reference_text(suffix == ".toml", MAX_DEPTH, "edges"))
    with pytest.raises(ReferenceError, match=r"Expected `float`, got `array` - at `\$.reference.edges\[0\]`"):
        load_reference(str(path))
    path.write_text(_reference_text(suffix == ".toml", MAX_DEPTH + 1, "edges"))
    with pytest.raises(ReferenceError, match=f"{LIMIT} at \\$.reference.edges\\[0\\]"):
        load_reference(str(path))
    good = ReferenceFile("fraud", CURVE, "within the limits")
    path.write_bytes(encode_reference(good, toml=suffix == ".toml"))
    assert load_reference(str(path)) == good


def test_reference_errors_keep_their_words(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text('{"name": "fraud", "reference": {"kind": "alert_rate", "edges": [0.5], "rates": ["x"]}}')
    with pytest.raises(
        ReferenceError, match=rf"^{re.escape(str(path))}: Expected `float`, got `str` - at `\$.reference.rates\[0\]`$"
    ):
        load_reference(str(path))
    path.write_text('{"name": "fraud",')
    with pytest.raises(
        ReferenceError, match=f"^{re.escape(str(path))}: not valid json \\(Input data was truncated\\)$"
    ):
        load_reference(str(path))
    with pytest.raises(ReferenceError, match="no such reference file"):
        load_reference(str(tmp_path / "missing.toml"))


# -- manifests -------------------------------------------------------------------------------

MANIFEST = Manifest(
    name="m",
    version="1",
    format="lightgbm",
    objective="binary",
    margin_kind="logit",
    output_transform="sigmoid",
    feature_names=[f"f{i}" for i in range(6)],
    num_feature=6,
    num_tree=4,
    beta=1.0,
    source_file="m.txt",
    source_sha256="0" * 64,
    library_file="libm.so",
    library_sha256="0" * 64,
    treelite_version="4",
    tl2cgen_version="1",
    compiler="gcc",
    compiler_flags=["-O3"],
    codegen_params={"quantize": 0},
    compile_seconds=0.1,
    created_at="2024-01-01T00:00:00+00:00",
    probe=Probe(seed=1, rows=2, margins=[0.5, -0.5]),
)


def _manifest_with(directory: pathlib.Path, where: str, value: str) -> pathlib.Path:
    """MANIFEST as written, with field ``where`` (added if new) replaced by the JSON ``value``."""
    directory.mkdir(exist_ok=True)
    write_manifest(directory, MANIFEST)
    doc = msgspec.json.decode((directory / MANIFEST_FILE).read_bytes())
    if where == "probe.margins":
        doc["probe"]["margins"] = None
    else:
        doc[where] = None
    raw = msgspec.json.encode(doc).decode().replace("null", value, 1)
    (directory / MANIFEST_FILE).write_text(raw)
    return directory / MANIFEST_FILE


def test_manifests_round_trip(tmp_path):
    write_manifest(tmp_path, MANIFEST)
    assert read_manifest(tmp_path) == MANIFEST


@pytest.mark.parametrize("where", ["feature_names", "probe.margins", "extra", "codegen_params", "$"])
def test_deep_manifests_name_the_file_and_the_limit(tmp_path, where):
    if where == "$":
        path = tmp_path / MANIFEST_FILE
        path.write_text(nested(DEEP))
    else:
        path = _manifest_with(tmp_path, where, nested(DEEP))
    with pytest.raises(LimitError, match=f"^{re.escape(str(path))}: {LIMIT}"):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(path))}: {LIMIT}"):
        load_artifact(tmp_path)


def test_manifests_at_the_depth_limit_are_read_past_it(tmp_path):
    """$.extra holding MAX_DEPTH - 1 levels is a document MAX_DEPTH deep: the manifest's own
    schema refuses it, as msgspec words it; one level more is the limit's refusal."""
    _manifest_with(tmp_path, "extra", nested(MAX_DEPTH - 1))
    with pytest.raises(msgspec.ValidationError, match=r"^Object contains unknown field `extra`$"):
        read_manifest(tmp_path)
    _manifest_with(tmp_path, "extra", nested(MAX_DEPTH))
    with pytest.raises(LimitError, match=f"{LIMIT} at \\$.extra"):
        read_manifest(tmp_path)


def test_manifest_errors_keep_their_words(tmp_path):
    _manifest_with(tmp_path, "num_tree", '"four"')
    with pytest.raises(msgspec.ValidationError, match=r"^Expected `int`, got `str` - at `\$.num_tree`$"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"name": "m",')
    with pytest.raises(msgspec.DecodeError, match=r"^Input data was truncated$"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path)


def test_manifests_beyond_the_element_limit_are_refused(tmp_path):
    many = msgspec.json.encode(["f"] * (MAX_ELEMENTS + 1)).decode()
    path = _manifest_with(tmp_path, "feature_names", many)
    with pytest.raises(LimitError, match=f"^{re.escape(str(path))}: more than {MAX_ELEMENTS} values"):
        read_manifest(tmp_path)


# -- a model that cannot be read ---------------------------------------------------------------


def test_an_unreadable_model_refuses_the_deployment_naming_it(tmp_path, lgb_case, monkeypatch):
    """An OSError while loading a model (here: out of file descriptors as its library is read)
    is a SpecError naming the predictor, the model and the error, which the admin API answers
    with a 422, not a 500."""
    reg = make_registry(tmp_path / "reg", {"lightgbm": lgb_case})
    spec = DeploymentSpec(
        predictors=[PredictorSpec("a", "1", "fraud", ["lightgbm/1"])], routes=[RouteSpec("*", "fraud", "a")]
    )
    build_snapshot(spec, ModelPool(reg), generation=1)  # it loads when it can be read
    real = artifact_module.sha256_file

    def exhausted(path):
        if path.suffix == ".so":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real(path)

    monkeypatch.setattr(artifact_module, "sha256_file", exhausted)
    words = r"deploy.toml: predictors\[0\] \(a\): model lightgbm/1: cannot be loaded: \[Errno 24\] Too many open files"
    with pytest.raises(SpecError, match=words):
        build_snapshot(spec, ModelPool(reg), generation=1, source="deploy.toml")
    with pytest.raises(SpecError, match=words):
        DeploymentStore(reg).validate(spec, source="deploy.toml")


# -- an interrupted compile --------------------------------------------------------------------

# A C compiler that writes the object file and records each unit in $LOG.  muse_entry.c (the
# second unit: sources are sorted) hangs as a long compile does, in a process with a child (as
# gcc's driver runs cc1): it records both pids in $PIDS, says "hung" through the FIFO $HUNG,
# and would log "finished" if it ever ended by itself.  With $FAIL set, main.c (the first)
# fails once the other has hung.
FAKE_CC = """#!/bin/sh
if [ "$1" = --version ]; then exec gcc --version; fi
prev= src= out=
for a; do
  [ "$prev" = -c ] && src=$(basename "$a")
  [ "$prev" = -o ] && out=$a
  prev=$a
done
echo "$src" >> "$LOG"
if [ "$src" = muse_entry.c ]; then
  sleep 30 &
  echo "$$ $!" > "$PIDS"
  echo hung > "$HUNG"
  wait
  echo finished >> "$LOG"
elif [ "$src" = main.c ] && [ -n "$FAIL" ]; then
  read x < "$HUNG"
  echo "main.c: error" >&2
  exit 1
fi
: > "$out"
"""


def _model_sources(tmp_path: pathlib.Path):
    import lightgbm as lgb
    from conftest import training_data

    X, y = training_data(rows=400)
    lgb.train({"objective": "binary", "num_leaves": 5, "verbose": -1}, lgb.Dataset(X, y), 12).save_model(
        str(tmp_path / "m.txt")
    )
    source = load_source_model(tmp_path / "m.txt")
    work = tmp_path / "src"
    work.mkdir()
    params = codegen.codegen_params(source.model.num_tree, source.model.num_feature)
    # The if/else generator: its trees are many translation units, built in parallel.
    return source, codegen.generate_sources(source, work, params, generator="ifelse")


def _wait_readable(fd: int) -> bytes:
    assert select.select([fd], [], [], 20.0)[0], "the fake compiler never said it hung"
    return os.read(fd, 100)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, or a zombie no one reaped), waiting for it
    up to 10 s: a pidfd is readable once it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 10.0)[0])
    finally:
        os.close(fd)


@pytest.mark.parametrize("interrupt", ["ctrl-c", "failed unit"])
def test_an_interrupted_build_starts_no_more_units_and_stops_its_compilers(tmp_path, monkeypatch, interrupt):
    """Ctrl-C during `muse compile` (a KeyboardInterrupt, here from the progress report after
    the first unit), or a unit that fails: units still queued never start, and the compiler
    running one (and its child) is stopped, not waited for."""
    source, sources = _model_sources(tmp_path)
    assert [s.name for s in sources[:2]] == ["main.c", "muse_entry.c"] and len(sources) >= 6
    fake_cc = tmp_path / "cc.sh"
    fake_cc.write_text(FAKE_CC)
    fake_cc.chmod(0o755)
    log, pids, hung = tmp_path / "log", tmp_path / "pids", tmp_path / "hung"
    os.mkfifo(hung)
    for name, value in (("CC", fake_cc), ("LOG", log), ("PIDS", pids), ("HUNG", hung)):
        monkeypatch.setenv(name, str(value))
    reports = []
    if interrupt == "ctrl-c":
        fifo = os.open(hung, os.O_RDONLY | os.O_NONBLOCK)

        def progress(done, total):
            reports.append(done)
            assert _wait_readable(fifo) == b"hung\n"  # the second unit is compiling now
            raise KeyboardInterrupt

        try:
            with pytest.raises(KeyboardInterrupt):
                codegen.build_library(source, sources, tmp_path / "lib.so", jobs=1, progress=progress)
        finally:
            os.close(fifo)
        assert reports == [1]
    else:
        monkeypatch.setenv("FAIL", "1")
        with pytest.raises(codegen.ModelFormatError, match=r"C compiler failed on main\.c: main\.c: error"):
            codegen.build_library(source, sources, tmp_path / "lib.so", jobs=2, progress=reports.append)
        assert reports == []
    driver, child = map(int, pids.read_text().split())
    assert _gone(driver) and _gone(child)
    started = log.read_text().splitlines()
    # main.c and muse_entry.c, which never finished; with two workers, the one main.c's ended
    # may have taken the next unit before the failure was seen.  None after that.
    assert started[:2] in (["main.c", "muse_entry.c"], ["muse_entry.c", "main.c"]), started
    assert "finished" not in started
    assert len(started) <= (2 if interrupt == "ctrl-c" else 3) < len(sources)
    assert not (tmp_path / "lib.so").exists()
