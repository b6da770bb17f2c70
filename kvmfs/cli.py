"""kvmfs's command line: mount, umount, stat (and run, in run.py).

    kvmfs mount DIR [--foreground] [--log FILE] [--debug] [--mode OCTAL] [--group NAME]
    kvmfs umount DIR [--lazy]
    kvmfs stat DIR [--json]
    kvmfs run [--mount DIR] [--mechanism M] [--dev PATH]... [--] PROGRAM [ARGS...]
    kvmfs --version

Owns the daemon's life outside fs.py: the checks before mounting, the fork, the
run directory and its `daemon` file, the default log file, unmounting, and
removing what a killed daemon left behind.  It must not reach into the mounted
objects; `stat` reads the mount's own info/ files.

The run directory, /dev/shm/kvmfs.PID.XXXXXXXX (the daemon's pid), holds the
kvm_run areas and a `daemon` file of `key: value` lines (pid, starttime,
mountpoint, log, dev once the mount answers).  `stat` finds a mount's daemon
through it; `mount` and `umount` remove the run directories of daemons that are
no longer alive.

Mounting in the background is a handshake over a pipe:
  1. the parent checks DIR (a directory, empty, not a mount already) and forks;
  2. the daemon mounts (fuse_setup), then stats DIR/kvm through the mount from a
     thread while its workers serve;
  3. it writes `ok DEV` (the mount's st_dev) or `error MESSAGE` to the pipe; the
     parent prints success only on `ok`, else the message, and exits 1.
"""
import argparse
import errno
import glob
import grp
import hashlib
import inspect
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import threading

from kvmfs import __version__

MOUNT_TIMEOUT = 30.0          # seconds for a detached daemon to answer on its mount
DEFAULT_MODE = 0o600          # /dev/kvm without a group: the owner only
GROUP_MODE = 0o660            # /dev/kvm's usual root:kvm 0660 when --group is given
HOLDERS_SHOWN = 5


class MountError(Exception):
    """The mount could not be made; the message says what and how to fix it."""


# --- mounts and daemons -------------------------------------------------------------
def _unescape(field):
    """A mountinfo path field: spaces, tabs, newlines, backslashes are octal escapes."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mount_entry(mnt):
    """The topmost mount on mnt as {dev, fstype, source}, or None."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == mnt:
                    found = {"dev": fields[2], "fstype": tail[0], "source": tail[1]}
    except OSError:
        pass
    return found


def _is_kvmfs(entry):
    return entry is not None and (entry["fstype"] == "fuse.kvmfs" or entry["source"] == "kvmfs")


def _starttime(pid):
    """The process's start time in clock ticks (/proc/PID/stat field 22), or None if it
    is gone or a zombie (a killed daemon whose parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except (OSError, IndexError):
        return None


def _run_dir_parent():
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _read_daemon_file(run_dir):
    info = {}
    try:
        with open(os.path.join(run_dir, "daemon")) as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition(": ")
                if sep:
                    info[key] = value
    except OSError:
        pass
    return info


def _write_daemon_file(run_dir, info):
    tmp = os.path.join(run_dir, ".daemon")
    with open(tmp, "w") as f:
        f.write("".join(f"{k}: {v}\n" for k, v in info.items()))
    os.replace(tmp, os.path.join(run_dir, "daemon"))


def _daemons():
    """(pid, run_dir, info, alive) for every kvmfs run directory of this machine."""
    out = []
    for run_dir in glob.glob(os.path.join(_run_dir_parent(), "kvmfs.*.*")):
        try:
            pid = int(os.path.basename(run_dir).split(".")[1])
        except ValueError:
            continue
        info = _read_daemon_file(run_dir)
        start = _starttime(pid)
        alive = start is not None and info.get("starttime", start) == start
        out.append((pid, run_dir, info, alive))
    return out


def remove_leftovers():
    """Remove the run directories of kvmfs daemons that are no longer alive."""
    uid = os.getuid()
    for pid, run_dir, info, alive in _daemons():
        try:
            owner = os.lstat(run_dir).st_uid
        except OSError:
            continue
        if not alive and (uid == 0 or owner == uid):
            shutil.rmtree(run_dir, ignore_errors=True)


def daemon_of(mnt):
    """The `daemon` file of the live daemon serving mnt (with pid and run_dir), or None."""
    entry = mount_entry(mnt)
    best = None
    for pid, run_dir, info, alive in _daemons():
        if not alive or info.get("mountpoint") != mnt:
            continue
        info = dict(info, pid=str(pid), run_dir=run_dir)
        if entry is not None and info.get("dev") == entry["dev"]:
            return info
        best = info
    return best


def default_log(mnt):
    """$XDG_RUNTIME_DIR/kvmfs/NAME-HASH.log, else /tmp/kvmfs-UID/NAME-HASH.log (HASH: of mnt)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        log_dir = os.path.join(runtime, "kvmfs")
    else:
        log_dir = os.path.join(tempfile.gettempdir(), f"kvmfs-{os.getuid()}")
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    st = os.lstat(log_dir)
    if not os.path.isdir(log_dir) or os.path.islink(log_dir) or st.st_uid != os.getuid():
        raise MountError(f"{log_dir} is not a directory of yours; remove it or pass --log FILE")
    name = os.path.basename(mnt.rstrip("/")) or "root"
    return os.path.join(log_dir, f"{name}-{hashlib.sha1(mnt.encode()).hexdigest()[:8]}.log")


def check_mountpoint(mnt):
    """Why kvmfs cannot be mounted on mnt (one line saying how to fix it), or None."""
    try:
        names = os.listdir(mnt)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return f"{mnt} is a kvmfs mount whose daemon died; run `kvmfs umount {mnt}` first"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{mnt} is not a directory; create it with `mkdir {mnt}`"
        return f"cannot read {mnt} ({e.strerror})"
    entry = mount_entry(mnt)
    if _is_kvmfs(entry):
        d = daemon_of(mnt)
        who = f" (daemon pid {d['pid']})" if d else ""
        return f"{mnt} is already a kvmfs mount{who}; run `kvmfs umount {mnt}` first"
    if names:
        return f"{mnt} is not empty; mount kvmfs on an empty directory"
    return None


# --- the daemon ---------------------------------------------------------------------
def _setup_logging(path, debug):
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kvmfs")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _fs_kwargs(kvmfs_class, mode, gid):
    """access_mode/access_gid for fs.KvmFs, as far as this build of it accepts them."""
    params = inspect.signature(kvmfs_class).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {"access_mode": mode, "access_gid": gid}
    return {k: v for k, v in wanted.items() if v is not None and (any_kw or k in params)}


def _mount_server(fs, kvmfs_obj, mnt, options):
    """fs.Server(...), with libfuse's own complaint (it writes to fd 2) as the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)
        try:
            server = fs.Server(kvmfs_obj, mnt, options=options)
            error = None
        except OSError as e:
            server, error = None, e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        lines = [ln.strip() for ln in said.read().decode(errors="replace").splitlines() if ln.strip()]
    if server is None:
        # libfuse's second line about 'nonempty' is not advice to follow here.
        why = next((ln for ln in lines if "nonempty" not in ln), None) or str(error.strerror)
        why = why.removeprefix("fuse: ")
        if "not empty" in why:
            why += f"; mount on an empty directory, or run `kvmfs umount {mnt}` first"
        raise MountError(f"cannot mount kvmfs on {mnt}: {why}")
    for line in lines:
        logging.getLogger("kvmfs").warning("libfuse: %s", line)
    return server


def serve(mnt, log_path, debug, report=None, log_name=None, mode=None, gid=None):
    """Mount on mnt and serve until unmounted (in this process).

    log_path: the log file (None: stderr); log_name: what `stat` names as the log.
    report(ok, text): called once, with the mount's st_dev once it answers, or the
    reason it failed; without it failures are printed to stderr.  Returns the exit code.
    """
    from kvmfs import fs, system
    _setup_logging(log_path, debug)
    log = logging.getLogger("kvmfs")
    run_dir = tempfile.mkdtemp(prefix=f"kvmfs.{os.getpid()}.", dir=_run_dir_parent())
    os.chmod(run_dir, 0o711)        # kvm_run files are reached by name only (fs.py tells the owner)
    daemon = {"pid": os.getpid(), "starttime": _starttime(os.getpid()), "mountpoint": mnt,
              "log": log_name or log_path or "stderr"}
    try:
        _write_daemon_file(run_dir, daemon)
        from kvmfs import _native
        _native.vcpu_install_intr_signal(signal.SIGUSR1)   # libfuse's "intr" signal
        _native.runarea_install_guard()                     # a truncated vcpuK.run is not fatal
        kwargs = _fs_kwargs(fs.KvmFs, mode, gid)
        options = ("intr", "allow_other") if _needs_allow_other(mode, gid) else ("intr",)
        before = os.stat(mnt).st_dev
        server = _mount_server(fs, fs.KvmFs(system.System(run_dir, mnt), **kwargs), mnt, options)

        def answer():
            """Stat the mount through the kernel, as a client would, then tell the parent."""
            try:
                st = os.stat(os.path.join(mnt, "kvm"))
                if st.st_dev == before:
                    raise OSError(errno.EIO, "the mount did not replace the directory")
                daemon["dev"] = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                _write_daemon_file(run_dir, daemon)
            except OSError as e:
                log.error("kvmfs on %s does not answer: %s", mnt, e.strerror)
                if report:
                    report(False, f"kvmfs on {mnt} does not answer ({e.strerror}); "
                                  f"see {daemon['log']}")
                return
            log.info("kvmfs mounted on %s (pid %d)", mnt, os.getpid())
            if report:
                report(True, daemon["dev"])

        threading.Thread(target=answer, name="answer", daemon=True).start()
        server.serve()
        log.info("kvmfs on %s unmounted", mnt)
    except MountError as e:
        if report or log_path:
            log.error("%s", e)
        if report:
            report(False, str(e))
        else:
            print(f"kvmfs: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _needs_allow_other(mode, gid):
    """Users other than the owner may open the files: FUSE's allow_other."""
    return gid is not None or (mode is not None and mode & 0o077 != 0)


def _user_allow_other():
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _await_daemon(rfd, pid, timeout):
    """Read the daemon's `ok DEV` / `error MESSAGE` line; (ok, text)."""
    data = b""
    while b"\n" not in data:
        ready, _, _ = select.select([rfd], [], [], timeout)
        if not ready:
            return None, None
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
    line = data.decode(errors="replace").partition("\n")[0]
    word, _, text = line.partition(" ")
    if word == "ok":
        return True, text
    if word == "error":
        return False, text
    try:
        _, status = os.waitpid(pid, 0)
        how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.WEXITSTATUS(status)}")
    except ChildProcessError:
        how = "exited"
    return False, f"the daemon {how} before the mount answered"


# --- commands -----------------------------------------------------------------------
def cmd_mount(args):
    mnt = os.path.realpath(args.dir)   # as /proc/self/mountinfo names it
    remove_leftovers()
    mode = args.mode if args.mode is not None else (GROUP_MODE if args.group is not None
                                                   else DEFAULT_MODE)
    try:
        why = check_mountpoint(mnt)
        if why:
            raise MountError(why)
        if args.mode is not None or args.group is not None:
            from kvmfs import fs
            kwargs = _fs_kwargs(fs.KvmFs, mode, args.group)
            if len(kwargs) < 1 + (args.group is not None):
                raise MountError("this kvmfs cannot set the files' mode or group yet; "
                                 "mount without --mode/--group")
            if _needs_allow_other(mode, args.group) and os.getuid() != 0 and not _user_allow_other():
                raise MountError("--group or a --mode for others needs FUSE's allow_other: "
                                 "add the line `user_allow_other` to /etc/fuse.conf (as root)")
        if args.foreground:
            return serve(mnt, args.log and os.path.abspath(args.log), args.debug,
                         mode=mode, gid=args.group)
        log_path = os.path.abspath(args.log) if args.log else default_log(mnt)
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise MountError(f"cannot open the log file {log_path} ({e.strerror}); "
                             f"pass --log FILE") from None
    except MountError as e:
        print(f"kvmfs: {e}", file=sys.stderr)
        return 1
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the daemon: detach, then serve
        os.close(rfd)
        # A process group of its own, but not a session of its own: setsid() would
        # also give the daemon its own scheduler autogroup, and wake-ups between
        # autogroups cost the client ~6 us more per request (measured).
        os.setpgid(0, 0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)              # libfuse and Python's last words go to the log too
        os.dup2(log_fd, 2)

        def report(ok, text):
            try:
                os.write(wfd, f"{'ok' if ok else 'error'} {text}\n".encode())
                os.close(wfd)
            except OSError:
                pass

        try:
            code = serve(mnt, None, args.debug, report=report, log_name=log_path,
                         mode=mode, gid=args.group)
        except BaseException:  # noqa: BLE001
            logging.getLogger("kvmfs").exception("daemon failed")
            report(False, f"the daemon failed; see {log_path}")
            code = 1
        os._exit(code)
    os.close(wfd)
    os.close(log_fd)
    ok, text = _await_daemon(rfd, pid, MOUNT_TIMEOUT)
    os.close(rfd)
    if ok:
        print(f"kvmfs mounted on {mnt}, logging to {log_path} (daemon pid {pid})")
        return 0
    if ok is None:
        print(f"kvmfs: the daemon (pid {pid}) has not answered on {mnt} within "
              f"{MOUNT_TIMEOUT:.0f} s; see {log_path}, or give up with `kvmfs umount {mnt}`",
              file=sys.stderr)
        return 1
    print(f"kvmfs: {text}" + ("" if log_path in text else f"; see {log_path}"), file=sys.stderr)
    return 1


def holders(mnt):
    """{pid: (command, [what])} of the processes using files under mnt (cwd, root, fds, maps)."""
    def under(path):
        path = path.removesuffix(" (deleted)")
        return path == mnt or path.startswith(mnt.rstrip("/") + "/")

    def short(path):
        return os.path.relpath(path.removesuffix(" (deleted)"), mnt)

    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc = f"/proc/{entry}"
        what = []
        for link in ("cwd", "root", "exe"):
            try:
                if under(os.readlink(f"{proc}/{link}")):
                    what.append(link)
            except OSError:
                pass
        try:
            for fd in sorted(os.listdir(f"{proc}/fd"), key=int):
                try:
                    target = os.readlink(f"{proc}/fd/{fd}")
                except OSError:
                    continue
                if under(target):
                    what.append(f"fd {fd} {short(target)}")
        except OSError:
            pass
        try:
            with open(f"{proc}/maps") as f:
                maps = {ln.split(None, 5)[5].strip() for ln in f if len(ln.split(None, 5)) == 6}
            what += [f"mmap {short(p)}" for p in sorted(maps) if under(p)]
        except OSError:
            pass
        if what:
            try:
                with open(f"{proc}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found[int(entry)] = (comm, what)
    return found


def _unmount(mnt, lazy):
    """Run the first unmount tool that works; (ok, its last complaint)."""
    flag = "-uz" if lazy else "-u"
    tools = [["fusermount3", flag, mnt], ["fusermount", flag, mnt],
             ["umount", "-l", mnt] if lazy else ["umount", mnt]]
    said = ""
    for cmd in tools:
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode == 0 or not _is_kvmfs(mount_entry(mnt)):
            return True, ""
        said = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else said
    return False, said


UNMOUNT_SETTLE = 5.0         # s to let the daemon finish releasing VMs whose files are closed


def cmd_umount(args):
    mnt = os.path.realpath(args.dir)   # as /proc/self/mountinfo names it
    remove_leftovers()
    entry = mount_entry(mnt)
    if entry is None:
        print(f"kvmfs: {mnt} is not mounted", file=sys.stderr)
        return 1
    if not _is_kvmfs(entry):
        print(f"kvmfs: {mnt} is a {entry['fstype']} mount, not kvmfs; leaving it alone",
              file=sys.stderr)
        return 1
    try:
        os.stat(mnt)
        dead = False
    except OSError as e:
        dead = e.errno == errno.ENOTCONN
    ok, said = _unmount(mnt, args.lazy)
    if not ok and dead:                 # nothing can be served any more: detach it
        ok, said = _unmount(mnt, True)
    held = {} if ok else holders(mnt)
    daemon = daemon_of(mnt)
    deadline = time.monotonic() + UNMOUNT_SETTLE
    while not ok and daemon and set(held) <= {int(daemon["pid"])} and time.monotonic() < deadline:
        # Only the daemon itself holds it: the kvm_run areas of VMs whose last file
        # was just closed, until it has handled those (asynchronous) releases.
        time.sleep(0.05)
        ok, said = _unmount(mnt, args.lazy)
        held = {} if ok else holders(mnt)
    if ok:
        remove_leftovers()
        return 0
    if held or "busy" in said.lower():
        shown = [f"pid {pid} ({comm}: {', '.join(what)})"
                 for pid, (comm, what) in sorted(held.items())[:HOLDERS_SHOWN]]
        more = len(held) - len(shown)
        users = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        print(f"kvmfs: {mnt} is busy" + (f", in use by {users}" if users else "") +
              f"; end them, or detach it now with `kvmfs umount --lazy {mnt}` "
              f"(the daemon serves them until they let go)", file=sys.stderr)
        return 1
    print(f"kvmfs: cannot unmount {mnt}" + (f" ({said})" if said else ""), file=sys.stderr)
    return 1


def cmd_stat(args):
    mnt = os.path.realpath(args.dir)   # as /proc/self/mountinfo names it
    name = "json" if args.json else "vms"
    try:
        with open(os.path.join(mnt, "info", name)) as f:
            text = f.read()
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            print(f"kvmfs: the daemon of the kvmfs mount on {mnt} is gone ({e.strerror}); "
                  f"run `kvmfs umount {mnt}`", file=sys.stderr)
        else:
            print(f"kvmfs: {mnt} is not a kvmfs mount ({e.strerror}); run `kvmfs mount DIR` first",
                  file=sys.stderr)
        return 1
    d = daemon_of(mnt)
    daemon = {"pid": int(d["pid"]), "log": d.get("log"), "run_dir": d["run_dir"]} if d else None
    if args.json:
        state = json.loads(text)
        state["daemon"] = daemon
        sys.stdout.write(json.dumps(state, indent=1) + "\n")
        return 0
    sys.stdout.write(f"mount: {mnt}\n")
    if daemon:
        sys.stdout.write(f"daemon pid: {daemon['pid']}\nlog: {daemon['log']}\n"
                         f"run dir: {daemon['run_dir']}\n")
    sys.stdout.write("\n" + text)
    return 0


def _octal_mode(text):
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode; give octal digits like 0660")
    return mode


def _group(text):
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise argparse.ArgumentTypeError(f"no group {text!r}; see `getent group`") from None


def main(argv=None):
    p = argparse.ArgumentParser(prog="kvmfs", description="The Linux KVM API as a FUSE filesystem.")
    p.add_argument("--version", action="version", version=f"kvmfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount kvmfs on DIR (returns once the mount answers)")
    m.add_argument("dir")
    m.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    m.add_argument("--log", help="daemon log file (default when detached: "
                   "$XDG_RUNTIME_DIR/kvmfs/ or /tmp/kvmfs-UID/, named by `kvmfs stat`; "
                   "stderr in the foreground)")
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument("--mode", type=_octal_mode, help="permissions of the files, as /dev/kvm's "
                   f"(default {DEFAULT_MODE:04o}, {GROUP_MODE:04o} with --group)")
    m.add_argument("--group", type=_group, help="group that owns the files (the owner is you)")
    m.set_defaults(fn=cmd_mount)
    u = sub.add_parser("umount", help="unmount DIR, also after the daemon died")
    u.add_argument("dir")
    u.add_argument("--lazy", action="store_true",
                   help="detach DIR even while in use (the daemon ends when the last user lets go)")
    u.set_defaults(fn=cmd_umount)
    s = sub.add_parser("stat", help="print the daemon and the VMs of a mount (--json: everything)")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stat)
    from kvmfs import run
    run.add_parser(sub)
    args = p.parse_args(argv)
    return args.fn(args)
