"""Build glue: maps the top-level folders onto the ``muse`` namespace and
builds the Cython extensions that call compiled models without the GIL."""

import pathlib

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

SUBPACKAGES = ["calib", "compile", "core", "server", "server.demo", "bench"]

HERE = pathlib.Path(__file__).parent.resolve()
# Cython finds a cimported module's .pxd by its package path (muse/compile/_library.pxd), and our
# folders become `muse.*` only when installed: lay that path out for it under build/.
STAGE = HERE / "build" / "cython-include" / "muse"
STAGE.mkdir(parents=True, exist_ok=True)
for name in ("compile",):
    link = STAGE / name
    if not link.exists():
        link.symlink_to(HERE / name)


def native(module: str, source: str, **extra) -> Extension:
    return Extension(
        module,
        [source],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
        **extra,
    )


extensions = cythonize(
    [
        native("muse.compile._library", "compile/_library.pyx", libraries=["dl"]),  # a model library and its call
        native("muse.compile._worker", "compile/_worker.pyx"),  # the native model thread
        native("muse.server._rows", "server/_rows.pyx"),  # decoded JSON rows -> matrix
    ],
    include_path=[str(STAGE.parent)],
    compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False},
)

setup(
    # `muse` itself is an implicit namespace: never install generic names such as `core`.
    packages=[f"muse.{name}" for name in SUBPACKAGES],
    package_dir={f"muse.{name}": name.replace(".", "/") for name in SUBPACKAGES},
    # Everything a module reads at run time ships with it (bench/http.py compiles loadgen.c).
    package_data={"muse.compile": ["*.c", "*.h", "*.pyx", "*.pxd"], "muse.server": ["*.pyx"], "muse.bench": ["*.c"]},
    ext_modules=extensions,
)
