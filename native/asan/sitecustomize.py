"""make test-asan: run every Python process under AddressSanitizer, and nothing else.

The sanitized native module needs libasan loaded first, which for a Python
host means LD_PRELOAD.  Exported to the whole test run, it would also
instrument the tools the tests start (dd, cat, gcc), which have findings of
their own.  So the Makefile only sets KVMFS_ASAN_LIB and puts this directory
on PYTHONPATH: a Python process that starts without libasan re-executes
itself with it preloaded, then drops LD_PRELOAD from its environment so its
other children start clean (a Python child re-executes itself the same way).
"""
import os
import sys

_lib = os.environ.get("KVMFS_ASAN_LIB")
if _lib:
    with open("/proc/self/maps") as _maps:
        _loaded = "libasan" in _maps.read()
    if not _loaded:
        os.environ["LD_PRELOAD"] = _lib
        os.execv(sys.executable, sys.orig_argv)
    os.environ.pop("LD_PRELOAD", None)
