"""Unmodified KVM programs (tests/programs/*.c) under `kvmfs run`, with /dev/kvm as the oracle.

The programs use nothing but <linux/kvm.h> and libc and print deterministic lines.
tests/programs/build.py builds each once per session as build/programs/NAME (dynamic)
and NAME-static.  Each runs first on the host's /dev/kvm (both builds must print the
same and exit 0; without /dev/kvm this skips, KVMFS_REQUIRE_KVM=1 makes it fail), then

    python -m kvmfs run --mechanism preload -- build/programs/NAME
    python -m kvmfs run --mechanism seccomp -- build/programs/NAME-static

must print the same lines and exit with the same status.  Those need FUSE (skip, or
fail under KVMFS_REQUIRE_FUSE=1); the seccomp runs need the static builds (skip when
this machine cannot link statically, fail under KVMFS_REQUIRE_SECCOMP=1).

Where the test runs as root and can make a mount namespace, each `kvmfs run` runs in
one where /dev/kvm is /dev/null: a program that reached the real device instead of
kvmfs fails at its first ioctl rather than passing on the host's KVM.  The runs on a
given mount (`--mount`, on the module's mount with its daemon log check) also check
that the program's VMs were created on that mount.

Every subprocess has a timeout and is killed (with its process group) on expiry.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, _fuse_unusable, daemon_env, skip_or_fail

_spec = importlib.util.spec_from_file_location(
    "programs_build", os.path.join(REPO, "tests", "programs", "build.py"))
programs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(programs_build)

PROGRAMS = programs_build.names()
MECHANISMS = {"preload": "", "seccomp": "-static"}      # mechanism -> build suffix
PROGRAM_TIMEOUT = 60        # one program on /dev/kvm
RUN_TIMEOUT = 240           # kvmfs run: daemon start, the program on the emulator, unmount


def run_cmd(cmd, timeout, env=None):
    """(returncode, stdout, stderr) of cmd; on timeout its process group is killed and
    the test fails."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = "", "(its output could not be collected)"
        pytest.fail(f"{' '.join(map(str, cmd))} did not end within {timeout} s; killed\n"
                    f"stdout:\n{out}\nstderr:\n{err}", pytrace=False)
    return p.returncode, out, err


def _static_why():
    return programs_build.static_available()


@pytest.fixture(scope="session")
def programs():
    """The directory of the built programs."""
    cc = programs_build.compiler()
    if not shutil.which(cc):
        pytest.skip(f"no C compiler ({cc}) to build tests/programs")
    try:
        return programs_build.build_all()
    except programs_build.BuildError as e:
        pytest.fail(str(e), pytrace=False)


class Oracle:
    """Each program's run on /dev/kvm, made once: (returncode, stdout, stderr)."""

    def __init__(self, outdir):
        self.outdir = outdir
        self.results = {}

    def path(self, name, suffix=""):
        return os.path.join(self.outdir, name + suffix)

    def __call__(self, name, suffix=""):
        key = name + suffix
        if key not in self.results:
            self.results[key] = run_cmd([self.path(name, suffix)], PROGRAM_TIMEOUT)
        return self.results[key]

    def expected(self, name):
        """The /dev/kvm result a kvmfs run must reproduce; fails when the program itself
        fails on /dev/kvm."""
        rc, out, err = self(name)
        if rc != 0:
            pytest.fail(f"{name} fails on /dev/kvm itself (exit {rc}), so it is no oracle:\n"
                        f"stdout:\n{out}\nstderr:\n{err}", pytrace=False)
        return rc, out


@pytest.fixture(scope="session")
def oracle(programs, real_kvm):
    return Oracle(programs)


def _need_fuse():
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)


_hide_kvm_probe = []


def hide_kvm_prefix():
    """A command prefix that runs its command where /dev/kvm is /dev/null (a private
    mount namespace), or [] where that cannot be done."""
    if not _hide_kvm_probe:
        prefix = []
        unshare = shutil.which("unshare")
        if os.geteuid() == 0 and unshare and os.path.exists("/dev/kvm"):
            candidate = [unshare, "--mount", "--propagation", "private", "--", "sh", "-c",
                         'mount --bind /dev/null /dev/kvm && exec "$@"', "sh"]
            try:
                r = subprocess.run(candidate + ["sh", "-c", "test -c /dev/kvm && ! test -s /dev/kvm && "
                                               "[ \"$(stat -c %t:%T /dev/kvm)\" = 1:3 ]"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
                if r.returncode == 0:
                    prefix = candidate
            except (OSError, subprocess.TimeoutExpired):
                pass
        _hide_kvm_probe.append(prefix)
    return list(_hide_kvm_probe[0])


def kvmfs_run(args, timeout=RUN_TIMEOUT, hide_kvm=True):
    """`python -m kvmfs run ARGS`: (returncode, stdout, stderr, where)."""
    prefix = hide_kvm_prefix() if hide_kvm else []
    cmd = prefix + [sys.executable, "-m", "kvmfs", "run", *map(str, args)]
    rc, out, err = run_cmd(cmd, timeout, env=daemon_env())
    where = "with /dev/kvm hidden" if prefix else "with /dev/kvm visible"
    return rc, out, err, where


def assert_same(name, mechanism, expected, got):
    (rc0, out0), (rc, out, err, where) = expected, got
    if (rc, out.splitlines()) != (rc0, out0.splitlines()):
        pytest.fail(f"`kvmfs run --mechanism {mechanism}` of {name} ({where}) differs from "
                    f"/dev/kvm\nexit status: {rc} (on /dev/kvm: {rc0})\n"
                    f"--- stdout on /dev/kvm ---\n{out0}--- stdout under kvmfs run ---\n{out}"
                    f"--- stderr under kvmfs run ---\n{err}", pytrace=False)


def _need_static(mechanism):
    if MECHANISMS[mechanism]:
        why = _static_why()
        if why:
            skip_or_fail("KVMFS_REQUIRE_SECCOMP", f"no static builds for the seccomp mechanism: {why}")


# --- the oracle --------------------------------------------------------------------
@pytest.mark.parametrize("name", PROGRAMS)
def test_program_on_dev_kvm(oracle, name):
    """The program passes on /dev/kvm, and its static build prints the same."""
    rc, out, err = oracle(name)
    assert rc == 0, f"{name} on /dev/kvm exited {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert out.strip(), f"{name} printed nothing"
    if _static_why() is None:
        rc_s, out_s, err_s = oracle(name, "-static")
        assert (rc_s, out_s) == (rc, out), (f"{name}-static differs from {name} on /dev/kvm "
                                            f"(exit {rc_s})\nstdout:\n{out_s}\nstderr:\n{err_s}")


# --- kvmfs run ---------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
@pytest.mark.parametrize("name", PROGRAMS)
def test_program_under_kvmfs_run(oracle, name, mechanism):
    """`kvmfs run --mechanism M -- PROGRAM` (a private mount) prints what /dev/kvm printed."""
    _need_fuse()
    _need_static(mechanism)
    expected = oracle.expected(name)
    got = kvmfs_run(["--mechanism", mechanism, "--", oracle.path(name, MECHANISMS[mechanism])])
    assert_same(name, mechanism, expected, got)


def test_kvmfs_run_exit_status():
    """kvmfs run exits with its program's status."""
    _need_fuse()
    rc, out, err, where = kvmfs_run(["--", "sh", "-c", "exit 7"], hide_kvm=False)
    assert rc == 7, f"kvmfs run -- sh -c 'exit 7' exited {rc}\nstdout:\n{out}\nstderr:\n{err}"


def _next_vm_id(mnt):
    """The id the mount gives its next VM (made and destroyed by text commands)."""
    with open(os.path.join(mnt, "cmd"), "r+") as f:
        f.write("create_vm\n")
        f.flush()
        f.seek(0)
        answer = f.read().split()
    assert answer[:1] == ["vm"], f"create_vm answered {answer}"
    with open(os.path.join(mnt, "cmd"), "w") as f:
        f.write(f"destroy_vm {answer[1]}\n")
    return int(answer[1])


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_program_on_given_mount(oracle, mounted, mechanism):
    """`kvmfs run --mount DIR` uses that mount: io_hlt prints what /dev/kvm printed, its VM
    is made there, and the daemon logs nothing unexpected."""
    _need_static(mechanism)
    expected = oracle.expected("io_hlt")
    before = _next_vm_id(mounted)
    got = kvmfs_run(["--mount", mounted, "--mechanism", mechanism, "--",
                     oracle.path("io_hlt", MECHANISMS[mechanism])])
    assert_same("io_hlt", mechanism, expected, got)
    after = _next_vm_id(mounted)
    assert after > before + 1, f"io_hlt made no VM on {mounted} (VM ids {before}, then {after})"
