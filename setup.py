# The one job of this file: hand the cffi builder to setuptools.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffi"])
