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
HEADERS = ("kvm_abi.h", "kvmfs_native.h")


def _cdef_text(path):
    # cdef takes declarations only: drop comments and keep #define NAME <int>.
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return text


ffi = FFI()
for _h in HEADERS:
    ffi.cdef(_cdef_text(os.path.join(HERE, _h)))

_sources = sorted(glob.glob(os.path.join(HERE, "*.c")))
ffi.set_source(
    "kvmfs._kvmfs_native",
    '#include "kvmfs_internal.h"\n',
    sources=[os.path.relpath(s) for s in _sources] if _sources else [],
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
