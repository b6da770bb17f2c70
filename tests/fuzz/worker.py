"""The fuzz client: runs one round of actions (gen.py) against a kvmfs mount.

    python tests/fuzz/worker.py MNT ROUND.json EVENTS

Every action is bracketed by two lines appended to EVENTS (one JSON object a
line, O_APPEND, shared by forked children):
    {"t": "B", "id": "12.3", "pid": P, "tid": T, "ts": ..., "op": ...}   begin
    {"t": "E", "id": "12.3", "pid": P, "tid": T, "r": result}            end
    {"t": "P", "pid": P, "ppid": Q} / {"t": "X", "pid": P}              a process starts / ends
    {"t": "F", "kind": "ior-leak", ...}                                  a finding seen here
so the driver can time every action from outside (a client stuck in the
kernel cannot report on itself) and knows which processes to wait for.

Errors the daemon answers are the point, not failures: each action records its
errno and goes on.  Only the driver decides what is a finding, except the
failed-_IOR check, which needs the caller's buffer: an ioctl whose direction is
read only and that fails must leave the caller's buffer as it was.
"""
import ctypes
import errno
import json
import mmap
import os
import random
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from kvmfs import abi  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.syscall.restype = ctypes.c_long
libc.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
libc.write.restype = ctypes.c_ssize_t
MAP_FAILED = ctypes.c_void_p(-1).value
U64 = (1 << 64) - 1
SCRATCH = 1 << 17                    # writable: [0, 64K) arguments, [64K, 128K) pointer targets
RUN_SIGNAL_FOR = 30.0                # a run helper keeps signalling at most this long


def gettid():
    return libc.syscall(186)


def kicked(delay_ms, fn, *args):
    """fn(*args) in this thread while another sends it SIGUSR1 every 20 ms after
    delay_ms: what ends a KVM_RUN (or a `run` command) on a guest that loops."""
    done = threading.Event()
    tid = threading.get_ident()

    def kicker():
        if done.wait(delay_ms / 1000):
            return
        end = time.monotonic() + RUN_SIGNAL_FOR
        while not done.is_set() and time.monotonic() < end:
            try:
                signal.pthread_kill(tid, signal.SIGUSR1)
            except (ProcessLookupError, OSError):
                return
            done.wait(0.02)
    k = threading.Thread(target=kicker, daemon=True)
    k.start()
    try:
        return fn(*args)
    finally:
        done.set()
        k.join()


def raw_write(fd, data):
    """write(2) once: os.write would retry after EINTR (PEP 475) and run a command again."""
    n = libc.write(fd, data, len(data))
    return n, (ctypes.get_errno() if n < 0 else 0)


def raw_ioctl(fd, cmd, arg):
    rc = libc.ioctl(fd, cmd & U64, ctypes.c_void_p(arg & U64 if arg else None))
    return rc, (ctypes.get_errno() if rc < 0 else 0)


class Scratch:
    """Per-thread memory for ioctl arguments: RW area, a PROT_NONE guard page, a read-only page."""

    def __init__(self):
        size = SCRATCH + 2 * 4096
        base = libc.mmap(None, size, 3, 0x22, -1, 0)        # PROT_RW, MAP_PRIVATE|MAP_ANONYMOUS
        if base in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap scratch")
        self.base = base
        self.guard = base + SCRATCH
        self.ro = base + SCRATCH + 4096
        ctypes.memset(self.ro, 0x5A, 4096)
        libc.mprotect(self.guard, 4096, 0)
        libc.mprotect(self.ro, 4096, 1)


class Events:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, **kw):
        kw.setdefault("pid", os.getpid())
        kw.setdefault("ts", time.time())
        try:
            os.write(self.fd, (json.dumps(kw, default=str) + "\n").encode())
        except OSError:
            pass


class Fd:
    __slots__ = ("fd", "kind", "vm", "vcpu", "path")

    def __init__(self, fd, kind, vm, vcpu, path):
        self.fd, self.kind, self.vm, self.vcpu, self.path = fd, kind, vm, vcpu, path


def kind_of(rel):
    parts = rel.split("/")
    if rel == "kvm":
        return "kvm", None, None
    if rel == "cmd":
        return "syscmd", None, None
    if parts[0] == "info":
        return "sysview", None, None
    vm = None
    if parts[0].startswith("vm") and parts[0][2:].isdigit():
        vm = int(parts[0][2:])
    if len(parts) == 2:
        n = parts[1]
        if n == "ctl":
            return "vmctl", vm, None
        if n == "cmd":
            return "vmcmd", vm, None
        if n == "mem":
            return "mem", vm, None
        if n.startswith("vcpu"):
            base = n.split(".")[0][4:]
            k = int(base) if base.isdigit() else None
            if n.endswith(".run"):
                return "vcpurun", vm, k
            if n.endswith(".cmd"):
                return "vcpucmd", vm, k
            return "vcpu", vm, k
    if len(parts) == 3 and parts[1] == "as1":
        return "mem", vm, None
    if len(parts) >= 3 and parts[1] == "info":
        return "vmview", vm, None
    return "other", vm, None


class Worker:
    def __init__(self, mnt, events):
        self.mnt = mnt
        self.ev = events
        self.lock = threading.RLock()
        self.fds = []
        self.vms = []            # VM ids this process created (or inherited)
        self.vcpus = []          # (vm id, vcpu id)
        self.mems = []
        self.maps = []           # (address, length)
        self.threads = []
        self.local = threading.local()
        self.mem_fd = os.open("/proc/self/mem", os.O_RDWR)

    # --- helpers ---------------------------------------------------------------------
    def scratch(self):
        s = getattr(self.local, "scratch", None)
        if s is None:
            s = self.local.scratch = Scratch()
        return s

    def ptr(self, p):
        s = self.scratch()
        kind = p[0]
        if kind == "scr":
            return s.base + (SCRATCH // 2) + p[1] % (SCRATCH // 2)
        if kind == "guard":
            return s.guard + p[1]
        if kind == "ro":
            return s.ro + p[1]
        if kind == "mem":
            with self.lock:
                if not self.mems:
                    return s.base + SCRATCH // 2
                m = self.mems[p[1] % len(self.mems)]
            return m.address + p[2] % m.size
        if kind == "null":
            return 0
        return p[1]

    def vm_id(self, ref):
        if ref[0] == "n":
            return ref[1]
        with self.lock:
            if not self.vms:
                return None
            return self.vms[ref[1] % len(self.vms)]

    def vcpu_ref(self, r):
        with self.lock:
            if not self.vcpus:
                return None
            return self.vcpus[r % len(self.vcpus)]

    def rel_path(self, p):
        if p[0] in ("kvm", "cmd"):
            return p[0]
        if p[0] == "info":
            return "info/" + p[1]
        if p[0] == "vm":
            vm = self.vm_id(p[1])
            if vm is None:
                vm = 0
            return f"vm{vm}/{p[2]}".rstrip("/")
        if p[0] == "vcpu":
            ref = self.vcpu_ref(p[1])
            if ref is None:
                return f"vm0/vcpu0{p[2]}"
            return f"vm{ref[0]}/vcpu{ref[1]}{p[2]}"
        return p[1]

    def pick_fd(self, r, kind=None):
        with self.lock:
            cands = [f for f in self.fds if kind is None or f.kind == kind]
            if not cands:
                cands = self.fds
            if not cands:
                return None
            return cands[r % len(cands)]

    def add_fd(self, fd, rel):
        kind, vm, vcpu = kind_of(rel)
        f = Fd(fd, kind, vm, vcpu, rel)
        with self.lock:
            self.fds.append(f)
        return f

    def open_rel(self, rel, flags=os.O_RDWR):
        fd = os.open(os.path.join(self.mnt, rel), flags | os.O_CLOEXEC)
        return self.add_fd(fd, rel)

    def close_fd(self, f):
        with self.lock:
            if f not in self.fds:
                return "gone"
            self.fds.remove(f)
        os.close(f.fd)
        return "ok"

    def fd_for(self, kind, vm, vcpu=None):
        """An open fd of that kind for that object, opened (and kept) when there is none."""
        with self.lock:
            for f in self.fds:
                if f.kind == kind and f.vm == vm and (vcpu is None or f.vcpu == vcpu):
                    return f
        rel = {"vmctl": f"vm{vm}/ctl", "vcpu": f"vm{vm}/vcpu{vcpu}", "kvm": "kvm"}[kind]
        return self.open_rel(rel)

    # --- running actions ---------------------------------------------------------------
    def run_list(self, actions, prefix=""):
        for i, a in enumerate(actions):
            aid = f"{prefix}{i}"
            self.ev.emit(t="B", id=aid, tid=gettid(), op=a.get("op"), a=_short(a))
            try:
                r = getattr(self, "do_" + a["op"])(a, aid)
            except OSError as e:
                r = "errno " + errno.errorcode.get(e.errno, str(e.errno))
            except Exception as e:  # noqa: BLE001 -- a worker-side problem, recorded, not fatal
                r = f"worker exception {type(e).__name__}: {e}"
            self.ev.emit(t="E", id=aid, tid=gettid(), r=str(r)[:200])
            if a["op"] == "orphan":
                return "orphaned"
        return None

    def do_sleep(self, a, aid):
        time.sleep(a["ms"] / 1000)

    def do_open(self, a, aid):
        rel = self.rel_path(a["path"])
        f = self.open_rel(rel, a["flags"])
        return f"fd {f.fd} {f.kind}"

    def do_close(self, a, aid):
        f = self.pick_fd(a["fd"], a.get("kind"))
        return "none" if f is None else self.close_fd(f)

    def do_dup(self, a, aid):
        f = self.pick_fd(a["fd"])
        if f is None:
            return "none"
        fd = os.dup(f.fd)
        with self.lock:
            self.fds.append(Fd(fd, f.kind, f.vm, f.vcpu, f.path))
        return f"fd {fd}"

    def build_arg(self, spec):
        """(address, length, bytes written or None) for a buf argument."""
        s = self.scratch()
        n = spec["len"]
        place = spec["place"]
        if place[0] == "scr":
            addr = s.base
        elif place[0] == "end":
            addr = s.guard - n + place[1]
        elif place[0] == "ro":
            return s.ro, n, None
        elif place[0] == "guard":
            return s.guard, n, None
        else:
            return 0, n, None
        writable = max(0, min(n, s.guard - addr))
        rng = random.Random(spec["seed"])
        if spec["fill"] == "zero":
            data = bytearray(writable)
        elif spec["fill"] == "pat":
            data = bytearray((b"\xa5\x5a\xc3\x3c" * (writable // 4 + 1))[:writable])
        else:
            data = bytearray(rng.getrandbits(8) for _ in range(writable))
        for kind, off, val in spec["ov"]:
            width = 4 if kind == "u32" else 8
            if kind == "ptr":
                val = self.ptr(val)
            if off + width <= writable:
                data[off:off + width] = (val & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        ctypes.memmove(addr, bytes(data), writable)
        return addr, n, bytes(data) if writable == n else None

    def do_ioctl(self, a, aid):
        f = self.pick_fd(a["fd"], a.get("kind"))
        if f is None:
            return "no fd"
        cmd = a["cmd"]
        arg = a["arg"]
        if arg["t"] == "int":
            if cmd == abi.KVM_RUN:
                rc, e = kicked(50, raw_ioctl, f.fd, cmd, arg["v"])
            else:
                rc, e = raw_ioctl(f.fd, cmd, arg["v"])
            self.note_created(f, cmd, rc)
            return f"rc {rc} {errno.errorcode.get(e, e) if e else ''}"
        addr, n, before = self.build_arg(arg)
        rc, e = kicked(50, raw_ioctl, f.fd, cmd, addr) if cmd == abi.KVM_RUN else raw_ioctl(f.fd, cmd, addr)
        if rc < 0 and before is not None and abi.ioc_dir(cmd) == abi.IOC_READ:
            after = ctypes.string_at(addr, n)
            if after != before:
                self.leak(f, cmd, e, before, after)
        return f"rc {rc} {errno.errorcode.get(e, e) if e else ''}"

    def note_created(self, f, cmd, rc):
        if rc < 0:
            return
        with self.lock:
            if cmd == abi.KVM_CREATE_VM and f.kind == "kvm":
                self.vms.append(rc)
            elif cmd == abi.KVM_CREATE_VCPU and f.kind == "vmctl" and f.vm is not None:
                self.vcpus.append((f.vm, rc))

    def leak(self, f, cmd, e, before, after):
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        self.ev.emit(t="F", kind="ior-leak", fdkind=f.kind, path=f.path, cmd=hex(cmd),
                     errno=errno.errorcode.get(e, e), changed=len(changed), size=len(before),
                     sample=after[changed[0]:changed[0] + 32].hex())

    def do_ior_probe(self, a, aid):
        """An unknown _IOR of 4096 bytes: the errno, and the caller's buffer untouched."""
        f = self.pick_fd(a["fd"], a["kind"])
        if f is None:
            return "no fd"
        nr = a["nr"]
        if a["type"] == abi.KVMIO and (2 << 30 | 4096 << 16 | abi.KVMIO << 8 | nr) in abi.IOCTL_NAMES:
            nr = 0xFF
        cmd = (2 << 30) | (4096 << 16) | (a["type"] << 8) | nr
        s = self.scratch()
        pattern = b"\xa5\x5a\xc3\x3c" * 1024
        ctypes.memmove(s.base, pattern, 4096)
        rc, e = raw_ioctl(f.fd, cmd, s.base)
        after = ctypes.string_at(s.base, 4096)
        if rc < 0 and after != pattern:
            self.leak(f, cmd, e, pattern, after)
        return f"rc {rc} {errno.errorcode.get(e, e) if e else ''}"

    def do_pread(self, a, aid):
        f = self.pick_fd(a["fd"], a.get("kind"))
        if f is None:
            return "no fd"
        return f"{len(os.pread(f.fd, a['size'], a['off']))} bytes"

    def do_pwrite(self, a, aid):
        f = self.pick_fd(a["fd"], a.get("kind"))
        if f is None:
            return "no fd"
        data = random.Random(a["seed"]).randbytes(a["size"])
        return f"{os.pwrite(f.fd, data, a['off'])} bytes"

    def do_mmap(self, a, aid):
        f = self.pick_fd(a["fd"], a.get("kind"))
        if f is None:
            return "no fd"
        addr = libc.mmap(None, a["len"], a["prot"], 1 if a["shared"] else 2, f.fd, a["off"])
        if addr in (None, MAP_FAILED):
            return "errno " + errno.errorcode.get(ctypes.get_errno(), "?")
        with self.lock:
            self.maps.append((addr, a["len"]))
        return f"mapped 0x{addr:x}"

    def do_touch(self, a, aid):
        """Through /proc/self/mem: a page past the end of the file is EIO here, not SIGBUS."""
        with self.lock:
            if not self.maps:
                return "no map"
            addr, length = self.maps[a["map"] % len(self.maps)]
        off = a["off"] % length
        if a["write"]:
            return f"{os.pwrite(self.mem_fd, bytes([a['seed'] & 0xFF]), addr + off)} written"
        return f"{len(os.pread(self.mem_fd, 8, addr + off))} read"

    def do_munmap(self, a, aid):
        with self.lock:
            if not self.maps:
                return "no map"
            addr, length = self.maps.pop(a["map"] % len(self.maps))
        return libc.munmap(addr, length)

    def do_read_view(self, a, aid):
        rel = self.rel_path(a["path"])
        fd = os.open(os.path.join(self.mnt, rel), os.O_RDONLY | os.O_CLOEXEC)
        total = 0
        try:
            while True:
                b = os.read(fd, 1 << 17)
                if not b:
                    break
                total += len(b)
                if total > 64 << 20:
                    return f"more than {total} bytes"
        finally:
            os.close(fd)
        return f"{total} bytes"

    def do_walk(self, a, aid):
        """Every name in the tree; every view and command file read (memory is not: huge)."""
        n = 0
        for root, dirs, files in os.walk(self.mnt):
            for name in files:
                p = os.path.join(root, name)
                if name in ("mem",) or name.endswith(".run") or name == "kvm" or name == "ctl" \
                        or (name.startswith("vcpu") and "." not in name and "/info" not in root):
                    continue
                try:
                    with open(p, "rb") as fh:
                        n += len(fh.read(1 << 22))
                except OSError:
                    pass
        return f"{n} bytes"

    def do_write_cmd(self, a, aid):
        rel = self.rel_path(a["target"])
        data = bytes.fromhex(a["hex"])
        fd = os.open(os.path.join(self.mnt, rel), os.O_RDWR | os.O_CLOEXEC)
        try:
            n, e = kicked(100, raw_write, fd, data)
            res = f"wrote {n}" if n >= 0 else "errno " + errno.errorcode.get(e, str(e))
            if a["read"]:
                reply = os.read(fd, 4096)
                res += " " + reply[:60].decode(errors="replace")
                if reply.startswith(b"vm ") and rel == "cmd":
                    try:
                        with self.lock:
                            self.vms.append(int(reply.split()[1]))
                    except ValueError:
                        pass
                if reply.startswith(b"vcpu ") and rel.endswith("/cmd"):
                    try:
                        vm = int(rel.split("/")[0][2:])
                        with self.lock:
                            self.vcpus.append((vm, int(reply.split()[1])))
                    except ValueError:
                        pass
        finally:
            if a["keep"]:
                self.add_fd(fd, rel)
            else:
                os.close(fd)
        return res

    def do_create_vm(self, a, aid):
        if a["via"] == "ioctl":
            k = self.fd_for("kvm", None)
            rc, e = raw_ioctl(k.fd, abi.KVM_CREATE_VM, a["type"])
            if rc < 0:
                return "errno " + errno.errorcode.get(e, str(e))
            vm = rc
        else:
            fd = os.open(os.path.join(self.mnt, "cmd"), os.O_RDWR | os.O_CLOEXEC)
            try:
                os.write(fd, f"create_vm {a['type']}\n".encode())
                vm = int(os.read(fd, 100).split()[1])
            finally:
                os.close(fd)
        with self.lock:
            self.vms.append(vm)
        if a["open_ctl"]:
            self.open_rel(f"vm{vm}/ctl")
        return f"vm {vm}"

    def do_create_vcpu(self, a, aid):
        vm = self.vm_id(a["vm"])
        if vm is None:
            return "no vm"
        if a["via"] == "ioctl":
            ctl = self.fd_for("vmctl", vm)
            rc, e = raw_ioctl(ctl.fd, abi.KVM_CREATE_VCPU, a["id"])
            if rc < 0:
                return "errno " + errno.errorcode.get(e, str(e))
            k = rc
        else:
            fd = os.open(os.path.join(self.mnt, f"vm{vm}/cmd"), os.O_RDWR | os.O_CLOEXEC)
            try:
                os.write(fd, f"create_vcpu {a['id']}\n".encode())
                k = int(os.read(fd, 100).split()[1])
            finally:
                os.close(fd)
        with self.lock:
            self.vcpus.append((vm, k))
        return f"vcpu {k}"

    def do_alloc_mem(self, a, aid):
        from kvmfs.client import alloc_guest_memory
        with self.lock:
            if len(self.mems) >= 8:
                return "enough"
            self.mems.append(alloc_guest_memory(a["size"], "fuzz"))
        return "ok"

    def do_invalidate_mem(self, a, aid):
        """What a VMM does before munmap: tell every VM, then replace the memory."""
        with self.lock:
            if not self.mems:
                return "no mem"
            m = self.mems[a["mem"] % len(self.mems)]
            vms = list(self.vms)
        for vm in vms:
            try:
                with open(os.path.join(self.mnt, f"vm{vm}/cmd"), "w") as fh:
                    fh.write(f"invalidate 0x{m.address:x} 0x{m.size:x}\n")
            except OSError:
                pass
        return "ok"

    def do_setup_guest(self, a, aid):
        """A VM with 64 KiB at gpa 0 (memfd), the code at 0x1000, vCPUs in real mode at 0x1000."""
        from kvmfs.client import alloc_guest_memory
        k = self.fd_for("kvm", None)
        rc, e = raw_ioctl(k.fd, abi.KVM_CREATE_VM, 0)
        if rc < 0:
            return "errno " + errno.errorcode.get(e, str(e))
        vm = rc
        with self.lock:
            self.vms.append(vm)
        ctl = self.open_rel(f"vm{vm}/ctl")
        mem = alloc_guest_memory(0x10000, "fuzz-guest")
        with self.lock:
            self.mems.append(mem)
        code = bytes.fromhex(a["code"])
        mem.map[0x1000:0x1000 + len(code)] = code
        region = abi.kvm_userspace_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES if a["log_dirty"] else 0,
                                                 0, 0x10000, mem.address)
        rc, e = raw_ioctl(ctl.fd, abi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))
        if a["smm_slot"]:
            r1 = abi.kvm_userspace_memory_region(1 << 16, 0, 0, 0x10000, mem.address)
            raw_ioctl(ctl.fd, abi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(r1))
        made = []
        for i in range(a["vcpus"]):
            rc, e = raw_ioctl(ctl.fd, abi.KVM_CREATE_VCPU, i)
            if rc < 0:
                continue
            f = self.open_rel(f"vm{vm}/vcpu{rc}")
            run = self.open_rel(f"vm{vm}/vcpu{rc}.run")
            addr = libc.mmap(None, abi.VCPU_MMAP_SIZE, 3, 1, run.fd, 0)
            if addr not in (None, MAP_FAILED):
                with self.lock:
                    self.maps.append((addr, abi.VCPU_MMAP_SIZE))
            s = abi.kvm_sregs()
            raw_ioctl(f.fd, abi.KVM_GET_SREGS, ctypes.addressof(s))
            s.cs.selector, s.cs.base = 0, 0
            raw_ioctl(f.fd, abi.KVM_SET_SREGS, ctypes.addressof(s))
            r = abi.kvm_regs()
            r.rip, r.rflags = 0x1000, 2
            raw_ioctl(f.fd, abi.KVM_SET_REGS, ctypes.addressof(r))
            with self.lock:
                self.vcpus.append((vm, rc))
            made.append(rc)
        return f"vm {vm} vcpus {made}"

    def do_run(self, a, aid):
        """KVM_RUN, ended by SIGUSR1 sent every 20 ms after delay_ms (or immediate_exit)."""
        ref = self.vcpu_ref(a["vcpu"])
        if ref is None:
            return "no vcpu"
        with self.lock:
            f = next((x for x in self.fds if x.kind == "vcpu" and (x.vm, x.vcpu) == ref), None)
        if f is None:
            try:
                f = self.open_rel(f"vm{ref[0]}/vcpu{ref[1]}")
            except OSError as e:
                return "open errno " + errno.errorcode.get(e.errno, str(e.errno))
        if a["imm"]:
            try:
                fd = os.open(os.path.join(self.mnt, f"vm{ref[0]}/vcpu{ref[1]}.run"), os.O_RDWR | os.O_CLOEXEC)
                os.pwrite(fd, b"\x01", 1)            # kvm_run.immediate_exit
                os.close(fd)
            except OSError:
                pass
        out = []
        for _ in range(a["runs"]):
            rc, e = kicked(a["delay_ms"], raw_ioctl, f.fd, abi.KVM_RUN, 0)
            out.append(f"{rc}/{errno.errorcode.get(e, e) if e else 'ok'}")
            if e in (errno.EBADF, errno.EIO):
                break
        return " ".join(out)

    def do_close_vm(self, a, aid):
        vm = self.vm_id(a["vm"])
        with self.lock:
            mine = [f for f in self.fds if f.vm == vm]
        for f in mine:
            self.close_fd(f)
        return f"closed {len(mine)}"

    def do_thread(self, a, aid):
        t = threading.Thread(target=self.run_list, args=(a["actions"], aid + "."), daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()
        return "started"

    def do_join(self, a, aid):
        while True:
            with self.lock:
                ts = [t for t in self.threads if t.is_alive()]
                self.threads = []
            if not ts:
                return "joined"
            for t in ts:
                t.join()

    def do_fork(self, a, aid):
        pid = os.fork()
        if pid == 0:
            self.child(a["actions"], aid + ".")
        if a["wait"]:
            os.waitpid(pid, 0)
        return f"pid {pid}"

    def do_orphan(self, a, aid):
        """Children keep the inherited fds and go on after this process exits."""
        pid = os.fork()
        if pid == 0:
            time.sleep(0.01)
            self.child(a["actions"], aid + ".")
        return f"pid {pid}; parent exits"

    def child(self, actions, prefix):
        code = 0
        try:
            # Another thread may have held the lock at fork(): the child gets its own.
            self.lock = threading.RLock()
            self.threads = []
            self.local = threading.local()
            self.ev.emit(t="P", ppid=os.getppid())
            self.run_list(actions, prefix)
            self.do_join({}, prefix + "join")
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            self.ev.emit(t="X")
            os._exit(code)


def _short(a):
    """The action without its nested lists (those are logged as they run)."""
    return {k: (f"[{len(v)} actions]" if k == "actions" else v) for k, v in a.items()}


def main(argv):
    mnt, round_path, events_path = argv
    with open(round_path) as f:
        rnd = json.load(f)
    signal.signal(signal.SIGUSR1, lambda *x: None)
    ev = Events(events_path)
    ev.emit(t="P", ppid=os.getppid())
    w = Worker(mnt, ev)
    try:
        if w.run_list(rnd["actions"]) != "orphaned":
            w.do_join({}, "join")
    finally:
        ev.emit(t="X")
        sys.stdout.flush()
        os._exit(0)                  # no close-at-exit ordering: the kernel closes what is open


if __name__ == "__main__":
    main(sys.argv[1:])
