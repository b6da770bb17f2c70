"""cffi builder for kvmfs._kvmfs_native: cdef the two headers, compile native/*.c.

Run directly (`python native/build.py`) to compile in place for development;
setup.py hands `ffi` to setuptools for installs.  unicorn is linked in
statically from build/unicorn (tools/build-unicorn: the release source plus
patches/), its symbols kept private, so the module neither needs nor clashes with
the libunicorn.so.2 of the Python binding.
"""
import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
UC = os.path.join(os.path.dirname(HERE), "build", "unicorn")
if not os.path.isdir(os.path.join(UC, "lib")):
    raise SystemExit("build/unicorn is missing: run tools/build-unicorn (make does)")
_UC_LIBS = [os.path.join(UC, "lib", a) for a in
            ("libunicorn_static.a", "libx86_64-softmmu.a", "libunicorn-common.a")]


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
    libraries=["m", "pthread"],
    extra_link_args=["-Wl,--start-group", *_UC_LIBS, "-Wl,--end-group",
                     "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic"],
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
