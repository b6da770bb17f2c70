"""cffi builder for kvmfs._kvmfs_native: cdef the two headers, compile native/*.c.

Run directly (`python native/build.py`) to compile in place for development;
setup.py hands `ffi` to setuptools for installs.  unicorn is linked in
statically from build/unicorn (scripts/build-unicorn: the release source plus
patches/), its symbols kept private, so the module neither needs nor clashes with
the libunicorn.so.2 of the Python binding.
"""
import glob
import os
import re
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
UC = os.path.join(os.path.dirname(HERE), "build", "unicorn")
if not os.path.isdir(os.path.join(UC, "lib")):
    raise SystemExit("build/unicorn is missing: run scripts/build-unicorn (make does)")
_UC_LIBS = [os.path.join(UC, "lib", a) for a in
            ("libunicorn_static.a", "libx86_64-softmmu.a", "libunicorn-common.a")]


def _strip_comments(text):
    # cdef takes declarations only (and #define NAME <int>): drop the comments.
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


_sources = sorted(glob.glob(os.path.join(HERE, "*.c")))


# KVMFS_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer, into
# build/asan (make test-asan; the module needs libasan preloaded in Python).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]


def make_ffi(sources, sanitize=False):
    ffi = FFI()
    for h in ("kvm_abi.h", "kvmfs_native.h"):
        ffi.cdef(_strip_comments(open(os.path.join(HERE, h)).read()))
    ffi.set_source(
        "kvmfs._kvmfs_native",
        '#include "kvmfs_internal.h"\n',
        sources=sources,
        include_dirs=[HERE, os.path.join(UC, "include")],
        libraries=["m", "pthread"],
        extra_link_args=["-Wl,--start-group", *_UC_LIBS, "-Wl,--end-group",
                         "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic",
                         *(SANITIZE_FLAGS if sanitize else [])],
        extra_compile_args=[
            "-O2",
            "-std=gnu11",
            "-Wall", "-Wextra",          # catch the usual mistakes
            "-Wno-unused-parameter",     # callbacks have fixed signatures
            "-Werror=implicit-function-declaration",  # a missing prototype is a bug, not a warning
            "-fvisibility=hidden",       # only the cdef'd API leaves the module
            *(SANITIZE_FLAGS if sanitize else []),
        ],
    )
    return ffi


# setuptools (setup.py) builds from the repository root: relative sources.
ffi = make_ffi([os.path.relpath(s, os.path.dirname(HERE)) for s in _sources])


def build_in_place(sanitize=False):
    """Compile into build/native (the generated C file and every object stay
    there) and install the one module as kvmfs/_kvmfs_native.abi3.so, the name
    an install through setuptools gives it, removing any other copy.  With
    sanitize, build into build/asan and install nothing."""
    root = os.path.dirname(HERE)
    os.chdir(root)
    tmp = os.path.join("build", "asan" if sanitize else "native")
    built = make_ffi(_sources, sanitize).compile(tmpdir=tmp, verbose=False,
                                                 target="_kvmfs_native.abi3.so")
    if sanitize:
        return
    dest = os.path.join("kvmfs", os.path.basename(built))
    for old in glob.glob(os.path.join("kvmfs", "_kvmfs_native*")):
        if old != dest:
            os.remove(old)
    shutil.copy2(built, dest + ".tmp")
    os.replace(dest + ".tmp", dest)   # never a half-written module


if __name__ == "__main__":
    build_in_place(sanitize=os.environ.get("KVMFS_SANITIZE") == "1")
