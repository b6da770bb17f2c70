# The one job of this file: hand the cffi builder to setuptools.  `make` builds
# the module itself (native/build.py, objects under build/) and sets
# KVMFS_NATIVE_BY_MAKE=1 so that its editable install does not compile it twice.
import os

from setuptools import setup

setup(cffi_modules=[] if os.environ.get("KVMFS_NATIVE_BY_MAKE") else ["native/build.py:ffi"])
