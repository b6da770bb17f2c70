"""Shared pytest fixtures: kvmfs mounts, their daemon logs, and the host's /dev/kvm.

`mounted` (module scope: a daemon that crashes fails one module, not every later
test) starts `python -m kvmfs mount --foreground` on a fresh directory, waits for
`<dir>/kvm` to appear and yields the mount point (a str that also carries `.log`,
`.proc` and `test_log()`).  At the end it always unmounts: first with
`python -m kvmfs umount`, then `fusermount -uz`, then `umount -l`, and finally
terminates the daemon.  Without a usable /dev/fuse it skips, unless
KVMFS_REQUIRE_FUSE=1, which turns the skip into a failure.

Daemon log check (S3QL's checklogs): a test that uses a mount fails when its
daemon wrote a WARNING, ERROR or CRITICAL line, a traceback, or anything at all
on stdout/stderr while the test ran, unless the test declared it:

    @pytest.mark.expect_log(r"KVM_RUN: EINVAL")      # regexes, searched in each line
    def test_x(mounted, expect_log):
        expect_log(r"read guest memory: EFAULT")      # or at run time
        expect_log.errnos(("EINVAL", 0))              # the warnings of these errno answers

(`pytestmark = pytest.mark.expect_log(...)` declares it for a module).  Only the
lines written during the test count: its setup and call are checked when the call
ends (the test fails), its teardown when the teardown ends (an error).
`mounted.test_log()` is the log text of the running test alone.  A failing test's
report gets that text as a section, after a moment for the daemon to write it.

`real_kvm` yields "/dev/kvm" when it can be opened; otherwise it skips, unless
KVMFS_REQUIRE_KVM=1.
"""
import errno
import os
import re
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


# A daemon log line that fails a test unless the test expects it.
PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |Traceback \(most recent call last\)")


class Mount(str):
    """A kvmfs mount point: the path itself, plus `.log` (daemon log file) and `.proc`.

    `mark` is where the running test's part of the log (and of the daemon's
    stdout/stderr, `.log + ".out"`) starts: byte offsets into both files."""

    def __new__(cls, path, log, proc):
        self = super().__new__(cls, path)
        self.log, self.proc = log, proc
        self.mark = (0, 0)
        return self

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no daemon log: {e})"

    def _since(self, path, offset):
        """The complete lines of `path` from `offset` on, and the offset after them."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return [], offset
        end = data.rfind(b"\n") + 1
        return data[:end].decode(errors="replace").splitlines(), offset + end

    def test_log(self):
        """The daemon log written since the running test started."""
        lines, _ = self._since(self.log, self.mark[0])
        return "".join(line + "\n" for line in lines)

    def take(self):
        """(log lines, stdout/stderr lines) written since `mark`; `mark` moves past them."""
        log, log_end = self._since(self.log, self.mark[0])
        out, out_end = self._since(self.log + ".out", self.mark[1])
        self.mark = (log_end, out_end)
        return log, out


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


def start_mount(mnt, log, *flags):
    """Start the daemon on `mnt` (with `kvmfs mount` flags); return a Mount once `mnt/kvm`
    exists, else fail the test."""
    cmd = [sys.executable, "-X", "faulthandler",          # a crash leaves its stacks in LOG.out
           "-m", "kvmfs", "mount", "--foreground", "--log", str(log), *flags, str(mnt)]
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


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    """A kvmfs mount point for one test module (see module docstring)."""
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)
    mnt = tmp_path_factory.mktemp("mnt")
    log = tmp_path_factory.mktemp("daemon") / "daemon.log"
    m = start_mount(mnt, log)
    try:
        yield m
    finally:
        m.unmounting = True
        unmount(m, m.proc)
        if m.proc.returncode:       # a crash at unmount fails the module's last test
            pytest.fail(f"kvmfs daemon on {m} exited with status {m.proc.returncode} "
                        f"when unmounted (log: {m.log}, {m.log}.out)", pytrace=False)


# --- the daemon log check -------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "expect_log(*patterns): daemon log lines (regexes) the test provokes on purpose")


def _mount_of(item):
    m = getattr(item, "funcargs", {}).get("mounted")
    return m if isinstance(m, Mount) else None


def _expected(item):
    patterns = list(getattr(item, "_kvmfs_expect_log", []))
    for mark in item.iter_markers("expect_log"):
        patterns.extend(mark.args)
    return [re.compile(p) for p in patterns]


def _check_log(item, phase):
    """Fail (raise) on the unexpected daemon output written since the mount's mark."""
    m = _mount_of(item)
    if m is None:
        return
    log, out = m.take()
    expected = _expected(item)
    bad = [line for line in log if PROBLEM.search(line) and not any(p.search(line) for p in expected)]
    unmounting = getattr(m, "unmounting", False)
    # fuse's own notes while it is unmounted ("fuse: failed to unmount ...") are nobody's
    bad += [f"(stdout/stderr) {line}" for line in out
            if line.strip() and (not unmounting or PROBLEM.search(line))
            and not any(p.search(line) for p in expected)]
    died = m.proc.poll()
    if died is not None and not unmounting:
        bad.append(f"(the daemon exited with status {died})")
    if bad:
        pytest.fail(f"kvmfs daemon output the test did not expect ({phase}; declare it with "
                    f"expect_log if it is provoked on purpose):\n  " + "\n  ".join(bad),
                    pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    result = yield
    m = _mount_of(item)
    if m is not None and not getattr(m, "_checked_once", False):
        m._checked_once = True     # a fresh mount: its start-up lines are nobody's
        m.take()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        result = yield
    except BaseException:
        m = _mount_of(item)
        if m is not None:
            time.sleep(0.2)        # let the daemon write what the failure provoked
            item._kvmfs_failed_log = m.test_log()
        raise
    _check_log(item, "setup and call")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    _check_log(item, "teardown")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    text = getattr(item, "_kvmfs_failed_log", None)
    if call.when == "call" and text is not None:
        report.sections.append(("kvmfs daemon log (this test)", text or "(empty)"))
    return report


class ExpectLog:
    """The `expect_log` fixture: expect_log(pattern, ...) declares daemon log lines
    (regexes) the test provokes on purpose; expect_log.errnos(answer) those of the
    errno answers named in `answer` (the daemon logs each errno answer as a warning)."""

    def __init__(self, patterns):
        self.patterns = patterns

    def __call__(self, *patterns):
        self.patterns.extend(patterns)

    def errnos(self, answer):
        names = set(re.findall(r"\bE[A-Z0-9]+\b", repr(answer))) & set(errno.errorcode.values())
        self(*(rf"WARNING kvmfs\.\w+: .*: {name}\b" for name in sorted(names)))


@pytest.fixture
def expect_log(request):
    """See ExpectLog."""
    return ExpectLog(request.node.__dict__.setdefault("_kvmfs_expect_log", []))


@pytest.fixture
def kvm(mounted):
    """A kvmfs.client.Kvm on the module's mount (modules comparing with /dev/kvm
    define their own `kvm`)."""
    from kvmfs.client import Kvm
    k = Kvm(mounted)
    yield k
    k.close()


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
