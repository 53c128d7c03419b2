"""A model library is native code: one that crashes, hangs or computes the wrong thing is
refused by a probe in a child process before this process loads it, with an error that names
it.  And a killed `muse compile` leaves nothing behind that the next one does not remove."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import msgspec
import pytest
from conftest import training_data

from muse.compile import ArtifactError, build_artifact, load_artifact, probe
from muse.compile import artifact as artifact_module
from muse.compile.manifest import read_manifest, sha256_file, write_manifest
from muse.core.deploy import DeploymentStore
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError
from muse.server.cli import main as cli
from muse.server.testing import build_registry

FEATURES = 6  # conftest.training_data's

# Libraries that are not what their manifest says, each built from this file with -D options:
# CTOR_SEGV / CTOR_EXIT crash or exit as they load; otherwise the file exports what a model
# library exports (compile/_library.pyx dlsym's) and predict writes VALUE, crashes (PREDICT_SEGV)
# or never returns (PREDICT_HANG).  FD_REPORT: the constructor lists the sockets it can see.
FAKE_LIBRARY = r"""
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(CTOR_SEGV)
__attribute__((constructor)) static void boom(void) { raise(SIGSEGV); }
#elif defined(CTOR_EXIT)
__attribute__((constructor)) static void boom(void) { _exit(7); }
#elif defined(FD_REPORT)
__attribute__((constructor)) static void report(void) {
  FILE* out = fopen(getenv("MUSE_TEST_FD_REPORT"), "w");
  DIR* dir = opendir("/proc/self/fd");
  struct dirent* e;
  char path[64], target[256];
  while ((e = readdir(dir)) != NULL) {
    snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n > 0) {
      target[n] = 0;
      fprintf(out, "%s %s\n", e->d_name, target);
    }
  }
  closedir(dir);
  fclose(out);
}
#else
int32_t muse_abi_version(void) { return 1; }
int32_t muse_num_feature(void) { return NFEAT; }
static int32_t fill(int64_t nrow, double* out) {
#if defined(PREDICT_SEGV)
  *(volatile int*)0 = 1;
#elif defined(PREDICT_HANG)
  for (;;) pause();
#endif
  for (int64_t i = 0; i < nrow; ++i) out[i] = VALUE;
  return 0;
}
int32_t muse_predict_f64(const double* X, int64_t nrow, int64_t ncol, int32_t margin, double* out) {
  return fill(nrow, out);
}
int32_t muse_predict_f32(const float* X, int64_t nrow, int64_t ncol, int32_t margin, double* out) {
  return fill(nrow, out);
}
#endif
"""


def _lgb_file(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    import lightgbm as lgb

    X, y = training_data(rows=400, seed=seed)
    params = {"objective": "binary", "num_leaves": 5, "verbose": -1, "seed": seed}
    lgb.train(params, lgb.Dataset(X, y), num_boost_round=4).save_model(str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("built")
    return build_artifact(_lgb_file(root / "m.txt"), root / "models", name="m")


@pytest.fixture
def art(built, tmp_path) -> pathlib.Path:
    """A fresh copy of a good artifact: a path this process has not probed yet."""
    return pathlib.Path(shutil.copytree(built, tmp_path / "reg" / "models" / "m" / "1"))


@pytest.fixture
def children(monkeypatch) -> list[list[str]]:
    """The command of every probe process started while the test runs."""
    started: list[list[str]] = []
    real = probe._start_child

    def counting(cmd):
        started.append(cmd)
        return real(cmd)

    monkeypatch.setattr(probe, "_start_child", counting)
    return started


def fake_library(tmp_path: pathlib.Path, name: str, *defines: str) -> pathlib.Path:
    src = tmp_path / "fake.c"
    src.write_text(FAKE_LIBRARY)
    out = tmp_path / f"{name}.so"
    cc = os.environ.get("CC", "gcc")
    flags = [f"-D{d}" for d in defines]
    subprocess.run([cc, "-shared", "-fPIC", f"-DNFEAT={FEATURES}", *flags, "-o", str(out), str(src)], check=True)
    return out


def replace_library(artifact: pathlib.Path, content_from: pathlib.Path, probe_field: bool = True) -> pathlib.Path:
    """Put ``content_from`` in place of the artifact's library, with the manifest's checksum updated
    to match (the case the checksum cannot catch); without ``probe_field``, as an older manifest."""
    manifest = read_manifest(artifact)
    lib = artifact / manifest.library_file
    shutil.copy(content_from, lib)
    write_manifest(artifact, msgspec.structs.replace(manifest, library_sha256=sha256_file(lib)))
    if not probe_field:
        doc = json.loads((artifact / "manifest.json").read_text())
        del doc["probe"]
        (artifact / "manifest.json").write_text(json.dumps(doc))
    return lib


def test_good_artifact_is_probed_once_then_loads(art, children):
    model = load_artifact(art)
    X, _ = training_data(rows=20, seed=9)
    assert model.predict(X).shape == (20,)
    assert len(children) == 1 and str(art.resolve()) in children[0][-4]
    load_artifact(art)
    load_artifact(art)
    assert len(children) == 1  # cached by (library path, sha256)
    manifest = read_manifest(art)
    assert manifest.probe is not None and len(manifest.probe.margins) == manifest.probe.rows >= 24
    rows = probe.probe_rows(manifest.probe.seed, manifest.probe.rows, FEATURES)
    assert (rows != rows).any()  # the probe has missing values
    assert model.predict(rows, margin=True).tolist() == manifest.probe.margins


def test_compile_probes_in_a_child_and_the_result_is_not_probed_again(tmp_path, children):
    target = build_artifact(_lgb_file(tmp_path / "m.txt"), tmp_path / "models", name="m")
    assert len(children) == 1 and "/models/m/.m-1" in children[0][-4]  # the staged library
    load_artifact(target)
    assert len(children) == 1


def test_constructor_crash_is_refused_and_this_process_survives(art, tmp_path):
    lib = replace_library(art, fake_library(tmp_path, "segv", "CTOR_SEGV"))
    with pytest.raises(ArtifactError) as info:
        load_artifact(art)
    message = str(info.value)
    assert str(lib.resolve()) in message or str(lib) in message
    assert "killed by SIGSEGV while loading" in message and "recompile" in message
    assert "\n" not in message


def test_constructor_exit_is_refused(art, tmp_path):
    replace_library(art, fake_library(tmp_path, "exit", "CTOR_EXIT"))
    with pytest.raises(ArtifactError, match=r"exited with status 7 while loading.*recompile"):
        load_artifact(art)


def test_crash_in_predict_is_refused(art, tmp_path):
    replace_library(art, fake_library(tmp_path, "predict-segv", "PREDICT_SEGV", "VALUE=0.0"))
    with pytest.raises(ArtifactError, match=r"killed by SIGSEGV while scoring the probe batch.*recompile"):
        load_artifact(art)


def test_hang_is_refused_after_the_timeout(art, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "PROBE_TIMEOUT", 1.0)
    replace_library(art, fake_library(tmp_path, "hang", "PREDICT_HANG", "VALUE=0.0"))
    with pytest.raises(ArtifactError, match=r"hung for 1 s while scoring the probe batch.*killed.*recompile"):
        load_artifact(art)


def test_wrong_numbers_are_refused(art, tmp_path):
    replace_library(art, fake_library(tmp_path, "const", "VALUE=0.25"))
    with pytest.raises(ArtifactError, match=r"probe scores differ from the manifest's expected output at row \d+"):
        load_artifact(art)


def test_another_models_library_is_refused(art, tmp_path):
    other = build_artifact(_lgb_file(tmp_path / "other.txt", seed=5), tmp_path / "models", name="other")
    lib = replace_library(art, other / read_manifest(other).library_file)
    with pytest.raises(ArtifactError) as info:
        load_artifact(art)
    assert f"{lib}: probe scores differ from the manifest's expected output at row " in str(info.value)


def test_old_manifest_without_probe_checks_loading_and_finite_scores(art, tmp_path, children):
    good = tmp_path / "good.so"
    shutil.copy(art / read_manifest(art).library_file, good)
    replace_library(art, good, probe_field=False)
    assert read_manifest(art).probe is None
    assert load_artifact(art).num_feature == FEATURES and len(children) == 1
    replace_library(art, fake_library(tmp_path, "nan", "VALUE=NAN"), probe_field=False)
    with pytest.raises(ArtifactError, match=r"probe score at row 0 is nan, not a finite number"):
        load_artifact(art)
    replace_library(art, fake_library(tmp_path, "segv", "CTOR_SEGV"), probe_field=False)
    with pytest.raises(ArtifactError, match="killed by SIGSEGV while loading"):
        load_artifact(art)


def test_probe_does_not_inherit_sockets(art, tmp_path, monkeypatch):
    report = tmp_path / "fds.txt"
    monkeypatch.setenv("MUSE_TEST_FD_REPORT", str(report))
    replace_library(art, fake_library(tmp_path, "fds", "FD_REPORT"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.set_inheritable(True)  # even so: the probe closes every descriptor but 0-2
        inode = os.fstat(listener.fileno()).st_ino
        with pytest.raises(ArtifactError, match=r"missing symbol muse_abi_version"):
            load_artifact(art)
    seen = report.read_text()
    assert " pipe:[" in seen  # the constructor ran and listed descriptors
    assert f"socket:[{inode}]" not in seen


def _deployment(art: pathlib.Path, tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A registry serving model m/1 (``art``), and a deployment file naming it."""
    reg = build_registry(tmp_path / "registry", models={"m": art.parent})
    spec = tmp_path / "deploy.toml"
    spec.write_text(
        '[[predictors]]\nname = "a"\nversion = "1"\nintent = "fraud"\nmodels = ["m/1"]\n\n'
        '[[routes]]\ntenant = "*"\nintent = "fraud"\nactive = "a"\n'
    )
    return reg.root, spec


def test_deploy_validate_refuses_a_crashing_library_with_one_line(art, tmp_path, capsys):
    root, spec = _deployment(art, tmp_path)
    assert cli(["deploy", "validate", str(spec), "--registry", str(root)]) == 0
    capsys.readouterr()
    lib = replace_library(art, fake_library(tmp_path, "segv", "CTOR_SEGV"))
    assert cli(["deploy", "validate", str(spec), "--registry", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("muse deploy: error:")
    assert lib.name in err and "killed by SIGSEGV while loading" in err


def test_deployment_store_refuses_with_spec_error(art, tmp_path):
    from muse.core.registry import Registry

    replace_library(art, fake_library(tmp_path, "segv", "PREDICT_SEGV", "VALUE=0.0"))
    store = DeploymentStore(Registry(_deployment(art, tmp_path)[0]))
    spec = DeploymentSpec(predictors=[PredictorSpec("a", "1", "fraud", ["m/1"])], routes=[RouteSpec("*", "fraud", "a")])
    with pytest.raises(SpecError, match=r"model m/1: .*killed by SIGSEGV while scoring the probe batch"):
        store.validate(spec)


# -- compile staging folders ---------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_folders_are_removed_by_the_next_compile(tmp_path):
    models = tmp_path / "models"
    host = artifact_module._host()
    dead = models / "m" / f".m-7.pid{_dead_pid()}@{host}-abc_1234"
    elsewhere = models / "other" / f".other-2.pid{_dead_pid()}@{host}-zz9"
    live = models / "m" / f".m-8.pid{os.getpid()}@{host}-live0001"
    other_host = models / "m" / f".m-9.pid{_dead_pid()}@not-{host}-x1"
    unrelated = models / "m" / ".m-notes"
    for folder in (dead, elsewhere, live, other_host, unrelated):
        folder.mkdir(parents=True)
        (folder / "lib.so").write_bytes(b"x" * 1000)
    build_artifact(_lgb_file(tmp_path / "m.txt"), models, name="m")
    assert not dead.exists() and not elsewhere.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert sorted(p.name for p in (models / "m").iterdir() if not p.name.startswith(".")) == ["1"]


def test_killed_compile_leaves_a_folder_the_next_compile_removes(tmp_path):
    """`muse compile` killed (SIGKILL) by its own C compiler, mid-build: its staging folder stays,
    named after the dead process, and the next compile removes it."""
    fake_cc = tmp_path / "cc.sh"
    fake_cc.write_text('#!/bin/sh\nif [ "$1" = --version ]; then exec gcc --version; fi\nkill -KILL $PPID\n')
    fake_cc.chmod(0o755)
    source = _lgb_file(tmp_path / "m.txt")
    models = tmp_path / "reg" / "models"
    cmd = [sys.executable, "-m", "muse.server.cli", "compile", str(source), "--registry", str(tmp_path / "reg")]
    compile_ = subprocess.Popen([*cmd, "--name", "m", "--jobs", "1"], env={**os.environ, "CC": str(fake_cc)})
    assert compile_.wait() == -9
    left = list((models / "m").iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".m-1.pid{compile_.pid}@") and (left[0] / "src").is_dir()
    build_artifact(source, models, name="m")
    assert sorted(p.name for p in (models / "m").iterdir()) == ["1"]


def test_failure_and_interrupt_remove_the_staging_folder(tmp_path, monkeypatch, capsys):
    source = _lgb_file(tmp_path / "m.txt")
    models = tmp_path / "reg" / "models"

    def interrupted(*args, **kwargs):
        staging = [p.name for p in (models / "m").iterdir()]
        assert len(staging) == 1 and staging[0].startswith(".m-1.pid")  # it exists now
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module.codegen, "build_library", interrupted)
    assert cli(["compile", str(source), "--registry", str(tmp_path / "reg"), "--name", "m"]) == 130
    assert capsys.readouterr().err == "muse compile: interrupted\n"
    assert list((models / "m").iterdir()) == []

    def failing(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(artifact_module.codegen, "build_library", failing)
    with pytest.raises(RuntimeError, match="compiler exploded"):
        build_artifact(source, models, name="m")
    assert list((models / "m").iterdir()) == []
