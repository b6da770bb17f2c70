"""Builds the test programs: every tests/programs/NAME.c into build/programs/NAME
(dynamically linked) and build/programs/NAME-static (-static).

    python3 tests/programs/build.py [NAME ...]

A target is rebuilt only when its source or common.h is newer.  When static linking
is impossible here (no libc.a: Debian's libc6-dev), the static targets are skipped
with one message, and `static_available()` says why.  As a module:
`build_all()` builds everything and returns the output directory.
"""
import glob
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "build", "programs")
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"]
COMMON = os.path.join(HERE, "common.h")


class BuildError(Exception):
    """A compiler failed; the message has its command and output."""


def compiler():
    return os.environ.get("CC", "cc")


def names():
    """The program names: the NAME of every tests/programs/NAME.c, sorted."""
    return sorted(os.path.basename(p)[:-2] for p in glob.glob(os.path.join(HERE, "*.c")))


_static_why = []


def static_available(cc=None):
    """None when `cc -static` links a threaded program here, else why not."""
    if not _static_why:
        cc = cc or compiler()
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "probe.c")
            with open(src, "w") as f:
                f.write("#include <pthread.h>\n#include <stdio.h>\n"
                        "static void *f(void *a) { return a; }\n"
                        "int main(void) { pthread_t t; pthread_create(&t, 0, f, 0);"
                        " pthread_join(t, 0); puts(\"ok\"); return 0; }\n")
            try:
                r = subprocess.run([cc, "-static", "-pthread", "-o", os.path.join(d, "probe"), src],
                                   capture_output=True, text=True, timeout=60)
                why = None if r.returncode == 0 else (
                    f"`{cc} -static` cannot link here (Debian: apt-get install libc6-dev): "
                    + (r.stderr.strip().splitlines() or ["no output"])[-1])
            except (OSError, subprocess.TimeoutExpired) as e:
                why = f"`{cc} -static` cannot run: {e}"
        _static_why.append(why)
    return _static_why[0]


def _stale(target, deps):
    try:
        t = os.path.getmtime(target)
    except OSError:
        return True
    return any(os.path.getmtime(d) > t for d in deps)


def build(name, static, cc=None, quiet=False):
    """Build one target if it is out of date; return its path."""
    cc = cc or compiler()
    src = os.path.join(HERE, name + ".c")
    target = os.path.join(OUT, name + ("-static" if static else ""))
    if not _stale(target, [src, COMMON]):
        return target
    os.makedirs(OUT, exist_ok=True)
    tmp = target + ".tmp"
    cmd = [cc] + CFLAGS + (["-static"] if static else []) + ["-o", tmp, src]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise BuildError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    os.replace(tmp, target)
    if not quiet:
        print(f"built {os.path.relpath(target, REPO)}")
    return target


def build_all(only=None, cc=None, quiet=True):
    """Build the programs (all, or those named in `only`); return the output directory.
    The static targets are left out when static linking is impossible."""
    cc = cc or compiler()
    wanted = names() if not only else list(only)
    unknown = [n for n in wanted if n not in names()]
    if unknown:
        raise BuildError(f"no such program: {', '.join(unknown)} (have: {', '.join(names())})")
    static_why = static_available(cc)
    for name in wanted:
        build(name, False, cc, quiet)
        if static_why is None:
            build(name, True, cc, quiet)
    return OUT


def main(argv):
    why = static_available()
    if why:
        print(f"skipping the -static targets: {why}", file=sys.stderr)
    try:
        build_all(argv, quiet=False)
    except BuildError as e:
        sys.exit(f"tests/programs/build.py: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
