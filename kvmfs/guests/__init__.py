"""The guest images: kvmfs/guests/NAME.S assembled into build/guests/NAME.bin.

Owns: turning a guest source into the flat binary a VMM copies into guest
memory.  Each source says at its top, on a line of its own,

    # load: 0x1000

(or ` * load: 0x1000` inside a /* */ comment; 0x1000 when there is none):
the guest-physical address its first byte is loaded at (the image is linked
there, so absolute addresses in it are right), followed by comment lines that
say how the VMM sets the vCPU up.  The source picks its own mode with
.code16/.code32/.code64.

    from kvmfs import guests
    guests.path("demo")   # build/guests/demo.bin, assembled if missing or older than the source
    guests.load("demo")   # its bytes
    guests.gpa("demo")    # 0x1000

`python -m kvmfs.guests` builds every image that is missing or older than its source
(the Makefile's `guests` target) and names the ones it built.  The sources ship with the
package; images go to build/guests in a source tree, else to ~/.cache/kvmfs/guests.
Needs binutils (`as`, `ld`, `objcopy`).
"""
import os
import re
import subprocess
import tempfile

SRC_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(SRC_DIR))
if os.path.exists(os.path.join(REPO, "pyproject.toml")):       # a source tree (or editable install)
    OUT_DIR = os.path.join(REPO, "build", "guests")
else:
    OUT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "kvmfs", "guests")
DEFAULT_GPA = 0x1000
_LOAD = re.compile(r"^\s*(?:#|/?\*)\s*load:\s*(0x[0-9a-fA-F]+|[0-9]+)\b", re.M)


def source(name):
    return os.path.join(SRC_DIR, name + ".S")


def names():
    """Every guest that has a source, sorted."""
    return sorted(f[:-2] for f in os.listdir(SRC_DIR) if f.endswith(".S"))


def gpa(name):
    """The load address the source declares (`# load: ADDR`), else 0x1000."""
    with open(source(name)) as f:
        m = _LOAD.search(f.read())
    return int(m.group(1), 0) if m else DEFAULT_GPA


def assemble_text(text, base=DEFAULT_GPA):
    """Assemble guest source text linked at base; returns the image bytes (for tests)."""
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "g.S"), os.path.join(d, "out.bin")
        with open(src, "w") as f:
            f.write(text)
        _assemble(src, base, out)
        with open(out, "rb") as f:
            return f.read()


def _assemble(src, base, out):
    with tempfile.TemporaryDirectory() as d:
        obj, elf = os.path.join(d, "g.o"), os.path.join(d, "g.elf")
        for cmd in (["as", "--64", "-o", obj, src],
                    ["ld", "-m", "elf_x86_64", "-N", "-e", "0", "-Ttext=%#x" % base,
                     "-o", elf, obj],
                    ["objcopy", "-O", "binary", "-j", ".text", "-j", ".data", elf,
                     os.path.join(d, "g.bin")]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}{p.stderr}")
        with open(os.path.join(d, "g.bin"), "rb") as f:
            data = f.read()
    tmp = out + ".%d.tmp" % os.getpid()
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out)       # atomic: a concurrent reader sees the old or the new image


def stale(name):
    out = os.path.join(OUT_DIR, name + ".bin")
    return not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(source(name))


def path(name):
    """OUT_DIR/NAME.bin, (re)assembled when missing or older than its source."""
    out = os.path.join(OUT_DIR, name + ".bin")
    if stale(name):
        os.makedirs(OUT_DIR, exist_ok=True)
        _assemble(source(name), gpa(name), out)
    return out


def load(name):
    """The image bytes of guest NAME."""
    with open(path(name), "rb") as f:
        return f.read()


def main(argv):
    for n in argv or names():
        if stale(n):
            p = path(n)
            print(f"assembled {os.path.relpath(p, REPO)}: {os.path.getsize(p)} bytes at gpa {gpa(n):#x}")


