"""Build glue: maps the top-level folders onto the ``muse`` namespace and
builds the Cython extension that calls compiled models without the GIL."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

SUBPACKAGES = ["calib", "compile", "core", "server", "bench"]

extensions = cythonize(
    [
        Extension(
            "muse.compile._native",
            ["compile/_native.pyx"],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3"],
            libraries=["dl"],
        )
    ],
    compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False},
)

setup(
    # `muse` itself is an implicit namespace: never install generic names such as `core`.
    packages=[f"muse.{name}" for name in SUBPACKAGES],
    package_dir={f"muse.{name}": name for name in SUBPACKAGES},
    package_data={"muse.compile": ["*.c", "*.h", "*.pyx"]},
    ext_modules=extensions,
)
