"""Assemble the test guests in guests/*.S (GNU as) into flat binaries.

assemble(name, base) runs `as` and `ld -Ttext=base` and `objcopy -O binary`
in a temporary directory and returns the image bytes, to be loaded at gpa
`base`.  Guests pick their mode with .code16/.code32/.code64 themselves.
"""
import os
import subprocess
import tempfile

GUESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guests")


def assemble_text(src, base=0x1000):
    with tempfile.TemporaryDirectory() as d:
        s, o, elf, binf = (os.path.join(d, n) for n in ("g.S", "g.o", "g.elf", "g.bin"))
        with open(s, "w") as f:
            f.write(src)
        subprocess.run(["as", "--64", "-o", o, s], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=%#x" % base, "-e", "0",
                        "--no-warn-rwx-segments", "-o", elf, o], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", elf, binf], check=True,
                       capture_output=True)
        with open(binf, "rb") as f:
            return f.read()


def assemble(name, base=0x1000):
    with open(os.path.join(GUESTS, name)) as f:
        return assemble_text(f.read(), base)
