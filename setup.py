# The cffi build of cext/ needs setup()'s cffi_modules hook, which pyproject.toml
# alone cannot express; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cext/build.py:ffibuilder"])
