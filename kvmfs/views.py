"""Read-only text views under MNT/info/ and MNT/vmN/info/: pure functions of state.

One record a line, `key: value` or whitespace-separated columns with a header,
so that cat, grep, cut and watch are all a reader needs.

A view of one VM is rendered while the open file holds that VM (fs.py); the
system views hold each VM while they read it and list only the VMs the reader
may use (root: all).
"""
import ctypes
import errno
import json
import threading

from kvmfs import _native as native, abi
from kvmfs.errors import KvmError

SYSTEM_VIEWS = ("vms", "caps", "json")
VM_VIEWS = ("memslots", "vcpus", "stats", "mmu", "notifier")
VM_DIRS = ("dirty",)

FLAG_NAMES = ((abi.KVM_MEM_LOG_DIRTY_PAGES, "log_dirty"), (abi.KVM_MEM_READONLY, "readonly"),
              (abi.KVM_MEM_GUEST_MEMFD, "guest_memfd"))


def flags_text(flags):
    return ",".join(n for bit, n in FLAG_NAMES if flags & bit) or "-"


def exists(vm, view):
    if view in VM_VIEWS:
        return True
    if view.startswith("vcpu"):
        rest = view[4:]
        return rest.isdigit() and int(rest) in vm.vcpus
    if view == "dirty":
        return True
    if view.startswith("dirty/"):
        return view[6:] in dirty_names(vm)
    return False


def listdir(vm, view):
    if view == "info":
        return list(VM_VIEWS) + [f"vcpu{k}" for k in sorted(vm.vcpus)] + ["dirty"]
    if view == "dirty":
        return dirty_names(vm)
    return []


def dirty_names(vm):
    return [f"{s.as_id}.{s.id}" for a in range(abi.KVM_ADDRESS_SPACE_NUM) for s in vm.slots(a)
            if s.flags & abi.KVM_MEM_LOG_DIRTY_PAGES]


class Fixed:
    """A view's text, taken whole when it is opened (small views: consistent reads)."""

    def __init__(self, text):
        self.data = text.encode()

    def read(self, offset, size):
        return self.data[offset:offset + size]


class Streamed:
    """A view produced piece by piece as it is read, so that its size costs the
    daemon nothing up front: produce(cursor) -> (bytes, next cursor), b"" at the
    end.  Reading on from where the last read stopped (cat, less) costs one piece
    at a time; reading an earlier offset starts over."""

    def __init__(self, produce):
        self.produce = produce
        self.lock = threading.Lock()
        self._start()

    def _start(self):
        self.cursor, self.base, self.data, self.done = 0, 0, b"", False

    def read(self, offset, size):
        with self.lock:
            if offset < self.base:
                self._start()
            while not self.done and self.base + len(self.data) < offset + size:
                piece, self.cursor = self.produce(self.cursor)
                if not piece:
                    self.done = True
                skip = min(max(offset - self.base, 0), len(self.data))
                self.data = self.data[skip:] + piece        # keep only what is not read yet
                self.base += skip
            start = offset - self.base
            return self.data[start:start + size]


def open_view(system, vm, view, who):
    """The view `view` (of vm, or of the system) for the caller `who`: a Fixed or
    Streamed object with read(offset, size)."""
    if vm is not None and view.startswith("dirty/"):
        return Streamed(dirty_producer(vm, view[6:]))
    if vm is not None and view == "mmu":
        return Streamed(lambda cursor: native.view_piece("sptes", vm.mmu, cursor=cursor))
    return Fixed(render(system, vm, view, who))


def render(system, vm, view, who):
    """The text of one (fixed) view for the caller `who` (a Caller)."""
    if vm is None:
        return {"vms": render_vms, "caps": render_caps, "json": as_json}[view](system, who)
    if view.startswith("vcpu") and view != "vcpus":
        return render_vcpu(vm.vcpus[int(view[4:])])
    return {"memslots": render_memslots, "vcpus": render_vcpus, "stats": render_stats,
            "notifier": lambda vm: vm.notifier.render(),
            "dirty": lambda vm: "\n".join(dirty_names(vm)) + "\n"}[view](vm)


def _visible_vms(system, who):
    """(id, vm) of the VMs `who` may use, each held while the caller iterates."""
    for vm_id, vm in system.live_vms():
        if who.uid != 0 and who.uid != vm.owner_uid:
            continue
        with vm.held() as alive:
            if alive:
                yield vm_id, vm


def owner_text(vm):
    return f"uid:{vm.owner_uid}" if vm.shell_owned else f"pid:{vm.owner_pid}"


def render_vms(system, who):
    lines = ["vm owner vcpus slots files"]
    for vm_id, vm in _visible_vms(system, who):
        nslots = sum(native.memslot_count(vm.mmu, a) for a in range(abi.KVM_ADDRESS_SPACE_NUM))
        lines.append(f"vm{vm_id} {owner_text(vm)} {len(vm.vcpus)} {nslots} {vm.files}")
    return "\n".join(lines) + "\n"


def render_caps(system, who):
    return "".join(f"{abi.CAP_NAMES.get(nr, nr)}: {val}\n" for nr, val in sorted(abi.CAPS.items()))


def slot_rows(vm):
    """Every memslot as a dict (both address spaces, sorted by gpa)."""
    rows = []
    for as_id in range(abi.KVM_ADDRESS_SPACE_NUM):
        for s in vm.slots(as_id):
            size = s.npages << abi.PAGE_SHIFT
            if vm.hostmem.allocated_by_kvmfs(s.userspace_addr):
                backing = "kvmfs-allocated shared"
            else:
                vma = vm.hostmem.find_vma(s.userspace_addr) if size else None
                backing = "unmapped" if vma is None else (vma.path or "anonymous") + (
                    " shared" if vma.perms[3] == "s" else " private")
            rows.append({"as": s.as_id, "slot": s.id, "gpa_start": s.base_gfn << abi.PAGE_SHIFT,
                         "gpa_end": ((s.base_gfn + s.npages) << abi.PAGE_SHIFT) - 1, "size": size,
                         "flags": flags_text(s.flags), "hva": s.userspace_addr,
                         "dirty_pages": s.dirty_count, "backing": backing})
    return rows


def render_memslots(vm):
    lines = ["as slot gpa_start gpa_end size flags hva dirty_pages backing"]
    for r in slot_rows(vm):
        lines.append(f"{r['as']} {r['slot']} 0x{r['gpa_start']:x} 0x{r['gpa_end']:x} 0x{r['size']:x} "
                     f"{r['flags']} 0x{r['hva']:x} {r['dirty_pages']} {r['backing']}")
    return "\n".join(lines) + "\n"


def render_vcpus(vm):
    lines = ["vcpu runs last_exit"]
    for k, v in sorted(vm.vcpus.items()):
        st = v.stats()
        if st is None:
            lines.append(f"{k} 0 -")
        else:
            lines.append(f"{k} {st.runs} {abi.EXIT_REASONS.get(st.last_exit_reason, st.last_exit_reason)}")
    return "\n".join(lines) + "\n"


def vcpu_state(v):
    """Registers, mode and exit counters of a vCPU as a dict."""
    out = {"id": v.id}
    st = v.stats()
    if st is None:
        return out
    regs = abi.kvm_regs()
    sregs = abi.kvm_sregs()
    events = abi.kvm_vcpu_events()
    smbase = abi.kvm_msr_entry(abi.MSR_IA32_SMBASE)
    if not v.lock.acquire(blocking=False):     # in KVM_RUN: registers are the guest's, moving
        out["state"] = "running"
        out["runs"] = st.runs
        return out
    try:
        for what, ctype, struct in (("get_regs", "struct kvm_regs", regs),
                                    ("get_sregs", "struct kvm_sregs", sregs),
                                    ("get_events", "struct kvm_vcpu_events", events)):
            native.vcpu_state(v.native, what, ctype, ctypes.addressof(struct), "view")
        entry = native.cast("struct kvm_msr_entry *", ctypes.addressof(smbase))
        native.vcpu_msrs(v.native, entry, 1, False, "view")
    finally:
        v.lock.release()
    for name in abi.kvm_regs._fields_:
        out[name[0]] = getattr(regs, name[0])
    for name in ("cr0", "cr2", "cr3", "cr4", "efer", "apic_base"):
        out[name] = getattr(sregs, name)
    out["cs"] = sregs.cs.selector
    out["mode"] = cpu_mode(sregs)
    out["smm"] = "yes" if events.smi.smm else "no"
    out["smi_pending"] = "yes" if events.smi.pending else "no"
    out["smbase"] = smbase.data
    out["runs"] = st.runs
    out["last_exit"] = abi.EXIT_REASONS.get(st.last_exit_reason, str(st.last_exit_reason))
    out["exits"] = {abi.EXIT_REASONS.get(i, str(i)): st.exits[i] for i in range(64) if st.exits[i]}
    return out


def cpu_mode(sregs):
    if not sregs.cr0 & 1:
        return "real"
    if sregs.efer & 0x400:
        return "long64" if sregs.cs.l else "compat32"
    paging = ""
    if sregs.cr0 & 0x80000000:
        paging = "+pae" if sregs.cr4 & 0x20 else ("+pse" if sregs.cr4 & 0x10 else "+paging")
    return ("protected32" if sregs.cs.db else "protected16") + paging


def render_vcpu(v):
    state = vcpu_state(v)
    lines = []
    for k, val in state.items():
        if k == "exits":
            lines += [f"exits.{name}: {n}" for name, n in val.items()]
        elif isinstance(val, int) and k not in ("id", "runs", "cs"):
            lines.append(f"{k}: 0x{val:x}")
        else:
            lines.append(f"{k}: {val}")
    return "\n".join(lines) + "\n"


def mmu_stats(vm):
    return native.mmu_get_stats(vm.mmu)


def render_stats(vm):
    out = dict(vm.counters)
    out.update({f"mmu_{k}": v for k, v in mmu_stats(vm).items()})
    exits = {}
    for v in vm.vcpus.values():
        st = v.stats()
        if st is not None:
            for i in range(64):
                if st.exits[i]:
                    name = abi.EXIT_REASONS.get(i, str(i))
                    exits[name] = exits.get(name, 0) + st.exits[i]
    out.update({f"exits_{k}": v for k, v in sorted(exits.items())})
    return "".join(f"{k}: {v}\n" for k, v in out.items())


def dirty_producer(vm, name):
    """info/dirty/A.S in pieces from C; a slot that stops logging ends the view."""
    as_id, sid = (int(x) for x in name.split("."))

    def produce(cursor):
        try:
            return native.view_piece("dirty", vm.mmu, as_id, sid, cursor=cursor)
        except KvmError as e:
            if e.errno != errno.ENOENT:
                raise
            return b"", cursor
    return produce


def as_json(system, who):
    """Everything `kvmfs stat --json` prints (of the VMs the reader may use)."""
    out = {"vms": {}}
    for vm_id, vm in _visible_vms(system, who):
        out["vms"][f"vm{vm_id}"] = {
            "owner_pid": vm.owner_pid, "owner_uid": vm.owner_uid, "shell_owned": vm.shell_owned,
            "memslots": slot_rows(vm),
            "vcpus": [vcpu_state(v) for _, v in sorted(vm.vcpus.items())],
            "stats": {**vm.counters, **{f"mmu_{k}": v for k, v in mmu_stats(vm).items()}}}
    return json.dumps(out, indent=1)
