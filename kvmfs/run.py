"""`kvmfs run`: an unmodified KVM program on kvmfs.

    kvmfs run [--mount DIR] [--mechanism auto|preload|seccomp] [--dev PATH]... [--cpuid-vmx]
              [--] PROGRAM [ARGS...]

PROGRAM's use of /dev/kvm (and of each --dev PATH, for programs told a device
path) goes to the kvmfs mount DIR, or to a private mount made for the run and
removed after it.  Its exit status is kvmfs run's (128+N if signal N ended it).

Two mechanisms (launch/):
  preload  libkvmfs-preload.so in LD_PRELOAD: for dynamically linked programs;
           in-process, so it also converts private anonymous guest RAM to
           shareable memory in place and reports the program's munmap, mremap,
           mmap(MAP_FIXED), mprotect and madvise of guest RAM as MMU-notifier calls.
  seccomp  kvmfs-seccomp, a seccomp user-notification supervisor: for static
           programs (and any other); it opens the device and installs the VM,
           vCPU and guest_memfd fds itself.
`auto` picks preload for a dynamically linked ELF or a script, seccomp for a
static ELF.
"""
import argparse
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = os.path.join(os.path.dirname(HERE), "build", "launch")
PRELOAD = os.path.join(LAUNCH, "libkvmfs-preload.so")
SUPERVISOR = os.path.join(LAUNCH, "kvmfs-seccomp")
PT_INTERP = 3


def is_dynamic_elf(path):
    """True for an ELF with an interpreter, False for a static ELF, None if not ELF."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:       # 64-bit ELF only
                return None
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    return any(int.from_bytes(table[i:i + 4], "little") == PT_INTERP
               for i in range(0, len(table), phentsize))


def pick_mechanism(program):
    path = shutil.which(program) or program
    dynamic = is_dynamic_elf(path)
    return "seccomp" if dynamic is False else "preload"


SYS_ARCH_PRCTL, ARCH_SET_CPUID = 158, 0x1012


def cpuid_faulting():
    """Whether this CPU can fault CPUID (tried on this thread, then turned back off)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_SET_CPUID, 0) != 0:
        return False
    libc.syscall(SYS_ARCH_PRCTL, ARCH_SET_CPUID, 1)
    return True


def _quiet(fn, *args):
    """Run a cli command with its stdout swallowed: stdout belongs to PROGRAM."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@contextlib.contextmanager
def private_mount(log, debug):
    """A kvmfs mount for one run, in the user's kvmfs directory (where logs go); its
    log is removed after a run that exits 0, unless it was asked for (log)."""
    from kvmfs import cli
    parent = os.path.dirname(cli.default_log("run"))
    mnt = tempfile.mkdtemp(prefix="run-", dir=parent)
    log_path = os.path.abspath(log) if log else cli.default_log(mnt)
    status = {"code": 1}
    try:
        ns = argparse.Namespace(dir=mnt, foreground=False, log=log_path, debug=debug, mode=None,
                                group=None)
        if _quiet(cli.cmd_mount, ns) != 0:
            raise SystemExit(1)
        try:
            yield mnt, status
        finally:
            if _quiet(cli.cmd_umount, argparse.Namespace(dir=mnt, lazy=False)) != 0:
                # something the program left behind still holds it: detach, the
                # daemon ends when that lets go
                _quiet(cli.cmd_umount, argparse.Namespace(dir=mnt, lazy=True))
    finally:
        try:
            os.rmdir(mnt)
        except OSError:
            pass
        if status["code"] == 0 and not log:
            with contextlib.suppress(OSError):
                os.unlink(log_path)
        elif status["code"] != 0:
            print(f"kvmfs run: the daemon's log is {log_path}", file=sys.stderr)


def command_for(mechanism, mnt, devices, argv, cpuid_vmx=False):
    """(argv, env) that run argv through `mechanism` onto the mount mnt."""
    env = dict(os.environ)
    if cpuid_vmx:
        env["KVMFS_CPUID_VMX"] = "1"            # launch/cpuid.c, in the preload library
    if mechanism == "preload":
        env["LD_PRELOAD"] = PRELOAD + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        env["KVMFS_MOUNT"] = mnt
        if devices:
            env["KVMFS_DEVICES"] = ":".join(devices)
        return argv, env
    cmd = [SUPERVISOR, "--mount", mnt]
    for d in devices:
        cmd += ["--dev", d]
    return cmd + ["--"] + argv, env


def run_program(mechanism, mnt, devices, argv, cpuid_vmx=False):
    cmd, env = command_for(mechanism, mnt, devices, argv, cpuid_vmx)
    try:
        child = subprocess.Popen(cmd, env=env)
    except OSError as e:
        print(f"kvmfs run: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    forwarded = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    old = {s: signal.signal(s, lambda sig, _f: child.send_signal(sig)) for s in forwarded}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code


def cmd_run(args):
    argv = args.program
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("kvmfs run: no PROGRAM given", file=sys.stderr)
        return 2
    mechanism = args.mechanism if args.mechanism != "auto" else pick_mechanism(argv[0])
    launcher = PRELOAD if mechanism == "preload" else SUPERVISOR
    if not os.path.exists(launcher):
        print(f"kvmfs run: {launcher} is not built; run `make`", file=sys.stderr)
        return 1
    if args.cpuid_vmx:
        if mechanism != "preload":
            print("kvmfs run: --cpuid-vmx works through the preload library only (a dynamically "
                  "linked program, --mechanism preload)", file=sys.stderr)
            return 1
        if not cpuid_faulting():
            print("kvmfs run: --cpuid-vmx needs CPUID faulting, which this CPU does not have "
                  "(no cpuid_fault in /proc/cpuinfo)", file=sys.stderr)
            return 1
    if args.mount:
        mnt = os.path.realpath(args.mount)
        if not os.path.exists(os.path.join(mnt, "kvm")):
            print(f"kvmfs run: {mnt} is not a kvmfs mount (no {mnt}/kvm)", file=sys.stderr)
            return 1
        return run_program(mechanism, mnt, args.dev, argv, args.cpuid_vmx)
    with private_mount(args.log, args.debug) as (mnt, status):
        status["code"] = run_program(mechanism, mnt, args.dev, argv, args.cpuid_vmx)
        return status["code"]


def add_parser(sub):
    r = sub.add_parser("run", help="run an unmodified KVM program on kvmfs (its exit status is ours)",
                       description=__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--mount", metavar="DIR", help="an existing kvmfs mount (default: a private "
                   "one for this run)")
    r.add_argument("--mechanism", choices=("auto", "preload", "seccomp"), default="auto")
    r.add_argument("--dev", action="append", default=[], metavar="PATH",
                   help="another device path the program opens as /dev/kvm")
    r.add_argument("--cpuid-vmx", action="store_true",
                   help="the program's CPUID reports VMX (a workaround for kvmtool's host check; "
                   "needs CPUID faulting and the preload mechanism)")
    r.add_argument("--log", metavar="FILE", help="keep the private mount's daemon log here "
                   "(default: removed after a run that exits 0)")
    r.add_argument("--debug", action="store_true", help="the private mount logs every request")
    r.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]")
    r.set_defaults(fn=cmd_run)
