"""Build the qsnap._core extension (Cython + the C helpers in qsnap/csrc)."""
import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "qsnap._core",
    sources=["qsnap/_core.pyx"] + sorted(glob.glob("qsnap/csrc/*.c")),
    include_dirs=["qsnap/csrc", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("_GNU_SOURCE", "1")],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=cythonize(
        [core],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
