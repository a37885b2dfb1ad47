# Everything about the package is in pyproject.toml; this file only adds the optional C
# helper of the data loader (iomm_scale/data/_native.c: the feature read + finite check in one
# pass, the tar header parse). Without a C compiler the build skips it (optional=True) and the
# loader runs its Python fallbacks, which give the same answers.
import os

from setuptools import Extension, setup

setup(ext_modules=[Extension("iomm_scale.data._native", ["iomm_scale/data/_native.c"],
                             extra_compile_args=[] if os.name == "nt" else ["-O3"], optional=True)])
