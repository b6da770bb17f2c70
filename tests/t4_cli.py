"""The command line on real mounts: mount/umount/stat refusals, busy mounts, logs, leftovers.

Each test runs `python -m kvmfs ...` as a user would, on its own directories, and
unmounts whatever it mounted.  Without usable FUSE the mounting tests skip
(KVMFS_REQUIRE_FUSE=1 makes that a failure).
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, _fuse_unusable, daemon_env, skip_or_fail, unmount

import kvmfs


def kvmfs_cmd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvmfs", *map(str, args)], cwd=REPO,
                          env=env or daemon_env(), capture_output=True, text=True, timeout=120)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def mounted_here(path):
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.fixture
def mount(tmp_path):
    """mount(name, *flags) -> (dir, daemon pid): a detached `kvmfs mount`, unmounted at the end."""
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)
    made = []

    def mount(name="m", *flags, env=None):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        made.append(d)
        r = kvmfs_cmd("mount", d, *flags, env=env)
        assert r.returncode == 0, r.stderr
        pid = int(re.search(r"daemon pid (\d+)\)", r.stdout).group(1))
        made.append(pid)
        return d, pid

    yield mount
    for item in made:
        if isinstance(item, int):
            if not wait_for(lambda: gone(item), 5):
                os.kill(item, signal.SIGKILL)
        elif mounted_here(item):
            unmount(str(item))


def test_version():
    r = kvmfs_cmd("--version")
    assert r.returncode == 0 and r.stdout == f"kvmfs {kvmfs.__version__}\n"
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert f'version = "{kvmfs.__version__}"' in f.read()


def test_bad_mode_and_group_are_refused(tmp_path):
    r = kvmfs_cmd("mount", tmp_path, "--mode", "0999")
    assert r.returncode == 2 and "octal" in r.stderr
    r = kvmfs_cmd("mount", tmp_path, "--group", "no-such-group-here")
    assert r.returncode == 2 and "no group" in r.stderr


def test_second_mount_on_a_live_mount_fails_and_the_first_keeps_serving(mount):
    d, pid = mount()
    r = kvmfs_cmd("mount", d)
    assert r.returncode == 1, r.stdout
    assert "already a kvmfs mount" in r.stderr and f"kvmfs umount {d}" in r.stderr
    assert r.stderr.count("\n") == 1
    assert os.path.exists(d / "kvm") and not gone(pid)


def test_mount_failure_comes_from_the_daemon_itself(mount):
    """Past the checks before forking, the daemon's own answer decides: no false success."""
    d, pid = mount()
    code = ("from kvmfs import cli; cli.check_mountpoint = lambda mnt: None; "
            f"raise SystemExit(cli.main(['mount', {str(d)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=daemon_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert f"cannot mount kvmfs on {d}: mountpoint is not empty" in r.stderr
    assert os.path.exists(d / "kvm") and not gone(pid)


def test_non_empty_directory_is_refused(tmp_path):
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)
    (tmp_path / "file").write_text("x")
    r = kvmfs_cmd("mount", tmp_path)
    assert r.returncode == 1 and "is not empty" in r.stderr
    assert not mounted_here(tmp_path)


def test_stat_names_daemon_and_default_log(mount, tmp_path):
    env = dict(daemon_env(), XDG_RUNTIME_DIR=str(tmp_path))
    d, pid = mount("m", env=env)
    logs = glob.glob(str(tmp_path / "kvmfs" / "m-*.log"))
    assert len(logs) == 1
    assert wait_for(lambda: "kvmfs mounted on" in open(logs[0]).read())
    r = kvmfs_cmd("stat", d)
    assert r.returncode == 0
    assert f"daemon pid: {pid}\n" in r.stdout and f"log: {logs[0]}\n" in r.stdout
    state = json.loads(kvmfs_cmd("stat", d, "--json").stdout)
    assert state["daemon"]["pid"] == pid and state["daemon"]["log"] == logs[0]
    assert state["vms"] == {}


def test_stat_on_a_killed_daemon_says_to_umount(mount):
    d, pid = mount()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: gone(pid))
    r = kvmfs_cmd("stat", d)
    assert r.returncode == 1 and f"run `kvmfs umount {d}`" in r.stderr
    r = kvmfs_cmd("mount", d)
    assert r.returncode == 1 and f"kvmfs umount {d}" in r.stderr
    assert kvmfs_cmd("umount", d).returncode == 0
    assert not mounted_here(d) and os.listdir(d) == []


def test_busy_umount_names_the_holder_and_keeps_the_mount(mount):
    d, pid = mount()
    holder = subprocess.Popen(["sleep", "600"], cwd=d)
    try:
        r = kvmfs_cmd("umount", d)
        assert r.returncode == 1
        assert "busy" in r.stderr and f"pid {holder.pid} (sleep: cwd)" in r.stderr
        assert "--lazy" in r.stderr
        assert mounted_here(d) and os.path.exists(d / "kvm")
    finally:
        holder.kill()
        holder.wait()
    assert kvmfs_cmd("umount", d).returncode == 0
    assert not mounted_here(d)
    assert wait_for(lambda: gone(pid))


def test_lazy_umount_detaches_a_busy_mount(mount):
    d, pid = mount()
    holder = subprocess.Popen(["sleep", "600"], cwd=d)
    try:
        r = kvmfs_cmd("umount", "--lazy", d)
        assert r.returncode == 0, r.stderr
        assert not mounted_here(d)
        assert not gone(pid)                       # still serving the holder
    finally:
        holder.kill()
        holder.wait()
    assert wait_for(lambda: gone(pid))             # the last user let go: the daemon ends


@pytest.mark.parametrize("then", ["umount", "mount"])
def test_a_killed_daemons_run_dir_is_removed_by_the_next_command(mount, then):
    d, pid = mount("a")
    run_dirs = glob.glob(f"/dev/shm/kvmfs.{pid}.*")
    if not run_dirs:
        pytest.skip("the run directory is not in /dev/shm here")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: gone(pid))
    assert os.path.isdir(run_dirs[0])
    if then == "umount":
        assert kvmfs_cmd("umount", d).returncode == 0
    else:
        mount("b")
    assert not os.path.exists(run_dirs[0])


def test_mode_and_group_reach_the_files(mount, tmp_path):
    from kvmfs import cli, fs
    if len(cli._fs_kwargs(fs.KvmFs, 0o660, os.getgid())) < 2:
        r = kvmfs_cmd("mount", tmp_path, "--mode", "0660")
        assert r.returncode == 1 and "--mode" in r.stderr
        pytest.skip("fs.KvmFs takes no access_mode/access_gid yet")
    d, pid = mount("m", "--mode", "0640", "--group", str(os.getgid()))
    st = os.stat(d / "kvm")
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == os.getgid()
