"""The package as a user installs it: a wheel built from this tree, installed into a
fresh environment, carries every file its modules read at run time."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("muse_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "muse/bench/loadgen.c" in names and "muse/compile/muse_entry.c" in names
    assert not any(n.split("/")[0] in ("core", "server", "compile", "calib", "bench") for n in names), (
        "generic top-level names must not be installed"
    )

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = pathlib.Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies come from this environment's site-packages as a plain path: its .pth files
    # (among them this tree's editable install) are not processed, so only the wheel provides muse.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )

    where = subprocess.run(
        [python, "-c", "import muse.server.app as m; print(m.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(site)), where
    help_text = subprocess.run([venv / "bin" / "muse", "--help"], check=True, capture_output=True, text=True).stdout
    assert "compile" in help_text and "serve" in help_text and "demo" in help_text
    # A benchmark's setup: bench/http.py compiles its load generator from the installed package.
    built = subprocess.run(
        [
            python,
            "-c",
            "import pathlib, sys; from muse.bench.http import build_loadgen; "
            "print(build_loadgen(pathlib.Path(sys.argv[1])))",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert pathlib.Path(built.stdout.strip()).is_file()
