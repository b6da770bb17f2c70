"""`kvmfs run --cpuid-vmx` (launch/cpuid.c): the program's CPUID reports VMX where the CPU
can fault CPUID, and kvmfs run says why not where it cannot."""
import os
import subprocess
import sys

import pytest

from kvmfs import run

PROGRAM = r'''
#include <cpuid.h>
#include <stdio.h>
int main(void)
{
	unsigned a, b, c, d;
	__cpuid(1, a, b, c, d);
	printf("vmx %u\n", (c >> 5) & 1);
	return 0;
}
'''


@pytest.fixture(scope="module")
def cpuid_program(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpuid")
    src = d / "cpuid.c"
    src.write_text(PROGRAM)
    subprocess.run(["cc", "-O2", "-o", str(d / "cpuid"), str(src)], check=True)
    return str(d / "cpuid")


def kvmfs_run(*args):
    return subprocess.run([sys.executable, "-m", "kvmfs", "run", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_cpuid_vmx(cpuid_program):
    r = kvmfs_run("--cpuid-vmx", "--mechanism", "preload", "--", cpuid_program)
    if run.cpuid_faulting():
        assert (r.returncode, r.stdout) == (0, "vmx 1\n"), r.stderr
    else:
        assert r.returncode == 1 and "needs CPUID faulting" in r.stderr, r.stderr


def test_cpuid_vmx_needs_the_preload_mechanism(cpuid_program):
    r = kvmfs_run("--cpuid-vmx", "--mechanism", "seccomp", "--", cpuid_program)
    assert r.returncode == 1 and "preload library only" in r.stderr
