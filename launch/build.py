"""Builds the launchers of `kvmfs run` into build/launch/:

    preload.c, cpuid.c -> libkvmfs-preload.so   (LD_PRELOAD into dynamically linked programs)
    seccomp.c  -> kvmfs-seccomp         (the seccomp user-notification supervisor)

Both include clients/kvmfs.h for kvmfs's own ioctls.  A target whose sources do not
all exist is skipped; a compiler error fails the build.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "build", "launch")
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-I", os.path.join(REPO, "clients")]
TARGETS = [
    (["preload.c", "cpuid.c"], "libkvmfs-preload.so", ["-shared", "-fPIC", "-pthread"], ["-ldl"]),
    (["seccomp.c"], "kvmfs-seccomp", ["-pthread"], []),
]


def build(cc=os.environ.get("CC", "cc")):
    os.makedirs(OUT, exist_ok=True)
    for srcs, out, flags, libs in TARGETS:
        paths = [os.path.join(HERE, src) for src in srcs]
        if not all(os.path.exists(p) for p in paths):
            continue
        target = os.path.join(OUT, out)
        inputs = paths + [os.path.join(REPO, "clients", "kvmfs.h")]
        if os.path.exists(target) and os.path.getmtime(target) >= max(map(os.path.getmtime, inputs)):
            continue
        cmd = [cc] + CFLAGS + flags + ["-o", target + ".tmp"] + paths + libs
        r = subprocess.run(cmd)
        if r.returncode:
            sys.exit(f"launch/build.py: {' '.join(cmd)} failed")
        os.replace(target + ".tmp", target)
        print(f"built build/launch/{out}")


if __name__ == "__main__":
    build()
