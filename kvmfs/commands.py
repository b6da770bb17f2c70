"""The text form of every ioctl: one command a line, written to a `cmd` file.

    echo create_vm > MNT/cmd                    -> MNT/vm0/ appears; `cat MNT/cmd` says "vm 0"
    echo 'set_user_memory_region 0 0 0 0x100000' > MNT/vm0/cmd   (no hva: kvmfs allocates)
    dd if=guest.bin of=MNT/vm0/mem conv=notrunc
    echo create_vcpu 0 > MNT/vm0/cmd
    echo 'set_regs rip=0x1000 rflags=0x2' > MNT/vm0/vcpu0.cmd
    echo run > MNT/vm0/vcpu0.cmd; cat MNT/vm0/vcpu0.cmd

A command calls the same handler as its ioctl, with the argument struct built
here, so it has the same meaning and errno: a failing command fails the
write() with the ioctl's errno.  The answer is read back from the same file:
from the same open file description when the writer keeps it open
(`exec 3<>cmd`), otherwise the object's last answer.
"""
import ctypes
import errno
import os
import shlex

from kvmfs import abi, views
from kvmfs.errors import KvmError

_last = {}          # id(object) -> last reply text


def last_reply(obj):
    return _last.get(id(obj), "")


def _int(text):
    return int(text, 0)


def _cap(text):
    try:
        return int(text, 0)
    except ValueError:
        return getattr(abi, "KVM_CAP_" + text.upper())


def execute(obj, ctx, text):
    """Run each line of text on obj; returns the reply text of the last one."""
    from kvmfs.system import System
    from kvmfs.vcpu import Vcpu
    from kvmfs.vm import Vm
    table = {System: SYSTEM_COMMANDS, Vm: VM_COMMANDS, Vcpu: VCPU_COMMANDS}[type(obj)]
    reply = ""
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        fn = table.get(words[0])
        try:
            if fn is None:
                raise KvmError(errno.EINVAL, "command", f"unknown command {words[0]!r}; "
                               f"known: {' '.join(sorted(table))}")
            if isinstance(obj, Vm):
                obj.check_owner(ctx)
            elif isinstance(obj, Vcpu):
                obj.vm.check_owner(ctx)
            try:
                if isinstance(obj, Vcpu):
                    with obj.lock:          # as the vCPU ioctls: one at a time per vCPU
                        reply = fn(obj, ctx, *words[1:])
                else:
                    reply = fn(obj, ctx, *words[1:])
            except (TypeError, ValueError, AttributeError) as e:
                raise KvmError(errno.EINVAL, words[0], f"bad arguments: {e}")
        except KvmError as e:
            _last[id(obj)] = f"error: {errno.errorcode.get(e.errno, e.errno)} {e}\n"
            raise
        _last[id(obj)] = reply
    return reply


def _call(obj, handler, ctx, arg=0, struct=None):
    data = ctypes.addressof(struct) if struct is not None else 0
    return handler(obj, ctx, arg, data)


# --- system ------------------------------------------------------------------------
def sys_create_vm(system, ctx, vm_type="0"):
    """create_vm [TYPE] -> vm N"""
    return f"vm {_call(system, type(system).create_vm, ctx, _int(vm_type))}\n"


def sys_check_extension(system, ctx, cap):
    """check_extension CAP (name or number) -> value"""
    return f"{_call(system, type(system).check_extension, ctx, _cap(cap))}\n"


def sys_api_version(system, ctx):
    return f"{_call(system, type(system).get_api_version, ctx)}\n"


SYSTEM_COMMANDS = {"create_vm": sys_create_vm, "check_extension": sys_check_extension,
                   "api_version": sys_api_version}


# --- VM ----------------------------------------------------------------------------
def vm_create_vcpu(vm, ctx, vcpu_id="0"):
    """create_vcpu ID -> vcpu K"""
    return f"vcpu {_call(vm, type(vm).create_vcpu, ctx, _int(vcpu_id))}\n"


def vm_set_user_memory_region(vm, ctx, slot, flags, gpa, size, hva=None):
    """set_user_memory_region SLOT FLAGS GPA SIZE [HVA]: without HVA kvmfs allocates the memory."""
    r = abi.kvm_userspace_memory_region(_int(slot), _int(flags), _int(gpa), _int(size), 0)
    if hva is not None:
        r.userspace_addr = _int(hva)
    elif r.memory_size:
        r.userspace_addr = vm.hostmem.allocate(r.memory_size)
    _call(vm, type(vm).set_user_memory_region, ctx, struct=r)
    return f"ok hva=0x{r.userspace_addr:x}\n"


def vm_get_dirty_log(vm, ctx, slot):
    """get_dirty_log SLOT -> the bitmap as hex u64 words, lowest page first"""
    info = [s for a in range(abi.KVM_ADDRESS_SPACE_NUM) for s in vm.slots(a)
            if (s.as_id << 16 | s.id) == _int(slot)]
    nwords = (info[0].npages + 63) // 64 if info else 1
    bitmap = (ctypes.c_uint64 * nwords)()
    own = type(ctx)()  # the daemon writes to itself: the bitmap lives here
    own.pid = own.tgid = os.getpid()
    r = abi.kvm_dirty_log(_int(slot), 0, ctypes.addressof(bitmap))
    _call(vm, type(vm).get_dirty_log, own, struct=r)
    return " ".join(f"0x{w:016x}" for w in bitmap) + "\n"


def vm_enable_cap(vm, ctx, cap, arg0="0"):
    """enable_cap CAP ARG0"""
    c = abi.kvm_enable_cap(_cap(cap), 0)
    c.args[0] = _int(arg0)
    _call(vm, type(vm).enable_cap, ctx, struct=c)
    return "ok\n"


def vm_set_tss_addr(vm, ctx, addr):
    _call(vm, type(vm).set_tss_addr, ctx, _int(addr))
    return "ok\n"


def vm_invalidate(vm, ctx, hva, size):
    """invalidate HVA SIZE: the VMM unmapped or replaced this range (an MMU-notifier call)"""
    vm.hostmem.invalidate(_int(hva), _int(size))
    vm.counters["notifier_invalidations"] = vm.counters.get("notifier_invalidations", 0) + 1
    return "ok\n"


def _young(vm, fn, as_id, gfn, npages):
    from kvmfs._native import ensure
    return f"{ensure(fn(vm.mmu, _int(as_id), _int(gfn), _int(npages)), 'young')}\n"


def vm_test_young(vm, ctx, as_id, gfn, npages):
    """test_young AS GFN NPAGES -> how many of those pages the guest touched since the last clear"""
    from kvmfs._native import lib
    return _young(vm, lib.kvmfs_mmu_test_young, as_id, gfn, npages)


def vm_clear_young(vm, ctx, as_id, gfn, npages):
    """clear_young AS GFN NPAGES -> the same count, and the accessed state is cleared"""
    from kvmfs._native import lib
    return _young(vm, lib.kvmfs_mmu_clear_young, as_id, gfn, npages)


def vm_memslots(vm, ctx):
    return views.render_memslots(vm)


VM_COMMANDS = {"create_vcpu": vm_create_vcpu, "set_user_memory_region": vm_set_user_memory_region,
               "get_dirty_log": vm_get_dirty_log, "enable_cap": vm_enable_cap,
               "set_tss_addr": vm_set_tss_addr, "memslots": vm_memslots,
               "invalidate": vm_invalidate, "test_young": vm_test_young, "clear_young": vm_clear_young}


# --- vCPU --------------------------------------------------------------------------
def _regs_text(st):
    return "".join(f"{n}: 0x{getattr(st, n):x}\n" for n, _ in st._fields_)


def vcpu_get_regs(vcpu, ctx):
    regs = abi.kvm_regs()
    _call(vcpu, type(vcpu).get_regs, ctx, struct=regs)
    return _regs_text(regs)


def vcpu_set_regs(vcpu, ctx, *assignments):
    """set_regs NAME=VALUE ...: the other registers keep their values"""
    regs = abi.kvm_regs()
    _call(vcpu, type(vcpu).get_regs, ctx, struct=regs)
    for a in assignments:
        name, value = a.split("=", 1)
        if name not in dict(abi.kvm_regs._fields_):
            raise ValueError(f"no register {name}")
        setattr(regs, name, _int(value))
    _call(vcpu, type(vcpu).set_regs, ctx, struct=regs)
    return "ok\n"


def vcpu_get_sregs(vcpu, ctx):
    s = abi.kvm_sregs()
    _call(vcpu, type(vcpu).get_sregs, ctx, struct=s)
    lines = [f"{seg}: base=0x{getattr(s, seg).base:x} limit=0x{getattr(s, seg).limit:x} "
             f"selector=0x{getattr(s, seg).selector:x} type={getattr(s, seg).type} "
             f"l={getattr(s, seg).l} db={getattr(s, seg).db}" for seg in abi.SEGMENTS]
    lines += [f"{n}: 0x{getattr(s, n):x}" for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
    return "\n".join(lines) + "\n"


def vcpu_set_sregs(vcpu, ctx, *assignments):
    """set_sregs NAME=VALUE ...: cr0=0x11, cs.base=0, cs.selector=0, gdt.limit=0x17, ..."""
    s = abi.kvm_sregs()
    _call(vcpu, type(vcpu).get_sregs, ctx, struct=s)
    for a in assignments:
        name, value = a.split("=", 1)
        obj, _, field = name.rpartition(".")
        target = getattr(s, obj) if obj else s
        if obj and obj not in abi.SEGMENTS + ("gdt", "idt") or field not in dict(type(target)._fields_):
            raise ValueError(f"no register {name}")
        setattr(target, field, _int(value))
    _call(vcpu, type(vcpu).set_sregs, ctx, struct=s)
    return "ok\n"


def vcpu_run(vcpu, ctx):
    """run -> the exit: reason and its fields"""
    _call(vcpu, type(vcpu).run_ioctl, ctx)
    run = vcpu.run
    reason = run.exit_reason
    out = [f"exit_reason: {abi.EXIT_REASONS.get(reason, reason)}"]
    if run.flags & abi.KVM_RUN_X86_SMM:
        out.append("smm: 1")
    if reason == abi.KVM_EXIT_IO:
        io = run.io
        data = bytes(vcpu.run_map[io.data_offset:io.data_offset + io.size * io.count])
        out += [f"direction: {'out' if io.direction else 'in'}", f"size: {io.size}",
                f"port: 0x{io.port:x}", f"count: {io.count}", f"data: {data.hex()}"]
    elif reason == abi.KVM_EXIT_MMIO:
        m = run.mmio
        out += [f"phys_addr: 0x{m.phys_addr:x}", f"len: {m.len}", f"is_write: {m.is_write}",
                f"data: {bytes(m.data)[:m.len].hex()}"]
    elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
        out += [f"suberror: {run.internal.suberror}"]
    return "\n".join(out) + "\n"


def vcpu_interrupt(vcpu, ctx, irq):
    _call(vcpu, type(vcpu).interrupt, ctx, struct=abi.kvm_interrupt(_int(irq)))
    return "ok\n"


def vcpu_smi(vcpu, ctx):
    """smi: KVM_SMI, taken by the next run"""
    _call(vcpu, type(vcpu).smi, ctx)
    return "ok\n"


def vcpu_get_vcpu_events(vcpu, ctx):
    ev = abi.kvm_vcpu_events()
    _call(vcpu, type(vcpu).get_vcpu_events, ctx, struct=ev)
    lines = [f"{part}.{name}: {getattr(getattr(ev, part), name)}"
             for part in ("exception", "interrupt", "nmi", "smi")
             for name, _ in type(getattr(ev, part))._fields_ if name != "pad"]
    return "\n".join(lines + [f"flags: 0x{ev.flags:x}"]) + "\n"


VCPU_COMMANDS = {"get_regs": vcpu_get_regs, "set_regs": vcpu_set_regs, "get_sregs": vcpu_get_sregs,
                 "set_sregs": vcpu_set_sregs, "run": vcpu_run, "interrupt": vcpu_interrupt,
                 "smi": vcpu_smi, "get_vcpu_events": vcpu_get_vcpu_events}
