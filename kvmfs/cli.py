"""kvmfs's command line: mount, umount, stat.

    kvmfs mount DIR [--foreground] [--log FILE] [--debug]
    kvmfs umount DIR
    kvmfs stat DIR [--json]
"""
import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def _wait_mounted(mnt, pid, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(mnt, "kvm")):
            return True
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return False


def _setup_logging(path, debug):
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kvmfs")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def serve(mnt, log_path, debug):
    """Mount on mnt and serve until unmounted (in this process)."""
    from kvmfs import fs, system
    _setup_logging(log_path, debug)
    log = logging.getLogger("kvmfs")
    run_dir = tempfile.mkdtemp(prefix=f"kvmfs.{os.getpid()}.", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.chmod(run_dir, 0o755)
    try:
        from kvmfs._native import lib
        if hasattr(lib, "kvmfs_vcpu_install_intr_signal"):
            lib.kvmfs_vcpu_install_intr_signal(signal.SIGUSR1)   # libfuse's "intr" signal
        else:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        server = fs.Server(fs.KvmFs(system.System(run_dir)), os.path.abspath(mnt))
        log.info("kvmfs mounted on %s (pid %d)", os.path.abspath(mnt), os.getpid())
        server.serve()
        log.info("kvmfs on %s unmounted", os.path.abspath(mnt))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def cmd_mount(args):
    mnt = os.path.abspath(args.dir)
    if not os.path.isdir(mnt):
        print(f"kvmfs: {mnt} is not a directory", file=sys.stderr)
        return 1
    if args.foreground:
        return serve(mnt, args.log, args.debug)
    log_path = os.path.abspath(args.log) if args.log else None
    pid = os.fork()
    if pid == 0:                        # the daemon: detach, then serve
        # A process group of its own, but not a session of its own: setsid() would
        # also give the daemon its own scheduler autogroup, and wake-ups between
        # autogroups cost the client ~6 us more per request (measured).
        os.setpgid(0, 0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if log_path is None:
            logging.getLogger("kvmfs").addHandler(logging.NullHandler())
        try:
            code = serve(mnt, log_path, args.debug)
        except BaseException:  # noqa: BLE001
            logging.getLogger("kvmfs").exception("daemon failed")
            code = 1
        os._exit(code)
    if _wait_mounted(mnt, pid):
        print(f"kvmfs mounted on {mnt} (daemon pid {pid})")
        return 0
    print(f"kvmfs: mounting on {mnt} failed" + (f"; see {log_path}" if log_path else
          "; run with --foreground to see why"), file=sys.stderr)
    return 1


def cmd_umount(args):
    mnt = os.path.abspath(args.dir)
    for cmd in (["fusermount", "-u", mnt], ["fusermount3", "-u", mnt], ["umount", mnt],
                ["fusermount", "-uz", mnt], ["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
        if shutil.which(cmd[0]) is None:
            continue
        if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return 0
    if not os.path.ismount(mnt):
        print(f"kvmfs: {mnt} is not mounted", file=sys.stderr)
    else:
        print(f"kvmfs: cannot unmount {mnt}", file=sys.stderr)
    return 1


def cmd_stat(args):
    name = "json" if args.json else "vms"
    try:
        with open(os.path.join(args.dir, "info", name)) as f:
            sys.stdout.write(f.read())
    except OSError as e:
        print(f"kvmfs: {args.dir} is not a kvmfs mount ({e.strerror}); run `kvmfs mount DIR` first",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="kvmfs", description="The Linux KVM API as a FUSE filesystem.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount kvmfs on DIR (returns once the mount answers)")
    m.add_argument("dir")
    m.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    m.add_argument("--log", help="daemon log file (default: none when detached, stderr in foreground)")
    m.add_argument("--debug", action="store_true", help="log every request")
    m.set_defaults(fn=cmd_mount)
    u = sub.add_parser("umount", help="unmount DIR, also after the daemon died")
    u.add_argument("dir")
    u.set_defaults(fn=cmd_umount)
    s = sub.add_parser("stat", help="print the VMs of a mount (--json: everything)")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stat)
    args = p.parse_args(argv)
    return args.fn(args)
