"""Shared pytest fixtures: a kvmfs mount and access to the host's real /dev/kvm.

`mounted` (session scope) starts `python -m kvmfs mount --foreground` on a fresh
directory, waits for `<dir>/kvm` to appear and yields the mount point (a str that
also carries `.log` and `.proc`).  At the end it always unmounts: first with
`python -m kvmfs umount`, then `fusermount -uz`, then `umount -l`, and finally
terminates the daemon.  Without a usable /dev/fuse it skips, unless
KVMFS_REQUIRE_FUSE=1, which turns the skip into a failure.

`real_kvm` yields "/dev/kvm" when it can be opened; otherwise it skips, unless
KVMFS_REQUIRE_KVM=1.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOUNT_TIMEOUT = 10.0


def _require(var):
    return os.environ.get(var, "") not in ("", "0")


def skip_or_fail(var, reason):
    """Skip with `reason`, or fail when the environment variable `var` demands the feature."""
    if _require(var):
        pytest.fail(f"{reason} (and {var}=1 requires it)")
    pytest.skip(reason)


def daemon_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _fuse_unusable():
    """Why FUSE cannot be used here, or None."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/fuse is not usable: {e}"
    os.close(fd)
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount is not installed (needed to mount as non-root)"
    return None


def _kvm_unusable():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable: {e}"
    os.close(fd)
    return None


class Mount(str):
    """A kvmfs mount point: the path itself, plus `.log` (daemon log file) and `.proc`."""

    def __new__(cls, path, log, proc):
        self = super().__new__(cls, path)
        self.log, self.proc = log, proc
        return self

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no daemon log: {e})"


def _is_mounted(path):
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(path)


def unmount(path, proc=None):
    """Unmount `path` by every means available, then make sure the daemon is gone."""
    attempts = [[sys.executable, "-m", "kvmfs", "umount", path]]
    for tool in ("fusermount3", "fusermount"):
        if shutil.which(tool):
            attempts.append([tool, "-uz", path])
    attempts.append(["umount", "-l", path])
    for cmd in attempts:
        if not _is_mounted(path):
            break
        try:
            subprocess.run(cmd, env=daemon_env(), cwd=REPO, timeout=10,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_mount(mnt, log):
    """Start the daemon on `mnt`; return a Mount once `mnt/kvm` exists, else fail the test."""
    cmd = [sys.executable, "-m", "kvmfs", "mount", "--foreground", "--log", str(log), str(mnt)]
    out = open(str(log) + ".out", "wb")
    proc = subprocess.Popen(cmd, env=daemon_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    m = Mount(str(mnt), str(log), proc)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(m, "kvm")):
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    status = "exited with %s" % proc.returncode if proc.poll() is not None else "still running"
    unmount(m, proc)
    try:
        with open(str(log) + ".out", errors="replace") as f:
            output = f.read()
    except OSError:
        output = ""
    pytest.fail(f"kvmfs mount did not come up within {MOUNT_TIMEOUT:.0f} s "
                f"(daemon {status}): {' '.join(cmd)}\n"
                f"--- daemon log ---\n{m.log_text()}\n--- daemon stdout/stderr ---\n{output}",
                pytrace=False)


@pytest.fixture(scope="session")
def mounted(tmp_path_factory):
    """A kvmfs mount point for the whole session (see module docstring)."""
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)
    mnt = tmp_path_factory.mktemp("mnt")
    log = tmp_path_factory.mktemp("daemon") / "daemon.log"
    m = start_mount(mnt, log)
    try:
        yield m
    finally:
        unmount(m, m.proc)
        text = m.log_text()
        if "Traceback" in text:
            sys.stderr.write(f"--- kvmfs daemon log ({m.log}) has tracebacks ---\n{text}\n")


@pytest.fixture(scope="session")
def real_kvm():
    """The path of the host's KVM device, when it can be opened."""
    why = _kvm_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_KVM", why)
    return "/dev/kvm"


# Tests import the package from this checkout (python -m pytest or plain pytest).
if REPO not in sys.path:
    sys.path.insert(0, REPO)
