"""The only importer of the compiled fast path (kvmfs._kvmfs_native).

`ffi` and `lib` are cffi's handles.  `ensure(rc, op)` turns a C -errno result
into KvmError, so callers above never look at raw return codes.
"""
from kvmfs._kvmfs_native import ffi, lib
from kvmfs.errors import KvmError


def ensure(rc, op, detail="", warn=True):
    if rc < 0:
        raise KvmError(-rc, op, detail, warn=warn)
    return rc
