"""Test guests: assemble source text or a kvmfs/guests/*.S file at a load address.

A thin front of kvmfs.guests (the one assembler), kept for the tests that
assemble inline sources.
"""
import os

from kvmfs.guests import SRC_DIR, assemble_text


def assemble(name, base=0x1000):
    """kvmfs/guests/NAME (with its .S) linked at base."""
    with open(os.path.join(SRC_DIR, name)) as f:
        return assemble_text(f.read(), base)


__all__ = ["assemble", "assemble_text"]
