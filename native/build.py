"""cffi builder for kvmfs._kvmfs_native: cdef the two headers, compile native/*.c.

Run directly (`python native/build.py`) to compile in place for development;
setup.py hands `ffi` to setuptools for installs.  libunicorn.so.2 comes from the
`unicorn` wheel: kvmfs/_native.py imports unicorn first, so the loader matches
our DT_NEEDED entry against the copy the binding already loaded.
"""
import glob
import os
import re

import unicorn
from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
UC = os.path.dirname(unicorn.__file__)


def _strip_comments(text):
    # cdef takes declarations only (and #define NAME <int>): drop the comments.
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


_sources = sorted(glob.glob(os.path.join(HERE, "*.c")))

ffi = FFI()
for _h in ("kvm_abi.h", "kvmfs_native.h"):
    ffi.cdef(_strip_comments(open(os.path.join(HERE, _h)).read()))
ffi.set_source(
    "kvmfs._kvmfs_native",
    '#include "kvmfs_internal.h"\n',
    sources=[os.path.relpath(s) for s in _sources],
    include_dirs=[HERE, os.path.join(UC, "include")],
    library_dirs=[os.path.join(UC, "lib")],
    libraries=[":libunicorn.so.2", "pthread"],
    extra_link_args=["-Wl,-rpath," + os.path.join(UC, "lib")],
    extra_compile_args=[
        "-O2",
        "-std=gnu11",
        "-Wall", "-Wextra",          # catch the usual mistakes
        "-Wno-unused-parameter",     # callbacks have fixed signatures
        "-Werror=implicit-function-declaration",  # a missing prototype is a bug, not a warning
        "-fvisibility=hidden",       # only the cdef'd API leaves the module
    ],
)

if __name__ == "__main__":
    os.chdir(os.path.dirname(HERE))
    ffi.compile(tmpdir=".", verbose=False)
