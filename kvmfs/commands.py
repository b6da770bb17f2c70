"""The text form of the ioctls: one command a line, written to a `cmd` file.

    echo create_vm > MNT/cmd                    -> MNT/vm0/ appears; `cat MNT/cmd` says "vm 0"
    echo 'set_user_memory_region 0 0 0 0x100000' > MNT/vm0/cmd   (no hva: kvmfs allocates)
    dd if=guest.bin of=MNT/vm0/mem conv=notrunc
    echo create_vcpu 0 > MNT/vm0/cmd
    echo 'setup real 0x1000' > MNT/vm0/vcpu0.cmd
    echo run > MNT/vm0/vcpu0.cmd; cat MNT/vm0/vcpu0.cmd
    echo help > MNT/vm0/cmd; cat MNT/vm0/cmd     (every command of that file, with its usage)

A command calls the handler of its ioctl (the row of kvmfs.ioctls it names),
with the argument struct built here, so it has the same meaning and errno: a
failing command fails the write() with the ioctl's errno.  Its arguments are
parsed against its usage line first; a bad one is EINVAL saying which and what
was expected.  Only then does the handler run, outside that check: a bug below
is a bug (EIO and a traceback in the log), never "bad arguments".

VMs created here belong to the user, not to the process that wrote the
command (shell commands are short-lived processes); they stay until
`destroy_vm N` or unmount.  The answer is read back from the same file: from
the same open file description when the writer keeps it open (`exec 3<>cmd`),
otherwise the object's last answer.
"""
import collections
import ctypes
import errno
import keyword
import shlex

from kvmfs import _native as native, abi, presets, views
from kvmfs.errors import KvmError


Command = collections.namedtuple("Command", "name usage fn ioctl")
U32, U64 = (1 << 32) - 1, (1 << 64) - 1


def last_reply(obj):
    """The last answer of obj's command file (kept on the object: it goes with it)."""
    return getattr(obj, "command_reply", "")


# --- argument parsing against the usage line ------------------------------------------
def _number(name, text, limit=U64):
    try:
        value = int(text, 0)
    except ValueError:
        raise KvmError(errno.EINVAL, "command", f"{name} {text!r}: expected a number "
                       "(decimal, 0x hex, 0o octal or 0b binary)") from None
    if not 0 <= value <= limit:
        raise KvmError(errno.EINVAL, "command", f"{name} {text}: expected 0..0x{limit:x}")
    return value


def _cap(name, text):
    if text[:1].isdigit():
        return _number(name, text, U32)
    value = getattr(abi, "KVM_CAP_" + text.upper(), None)
    if not isinstance(value, int):
        raise KvmError(errno.EINVAL, "command", f"{name} {text!r}: no such capability "
                       "(a number or a name such as NR_MEMSLOTS)")
    return value


def _mode(name, text):
    if text not in presets.MODES:
        raise KvmError(errno.EINVAL, "command", f"{name} {text!r}: expected one of "
                       f"{', '.join(presets.MODES)}")
    return text


# The type of an argument, by the name its usage line gives it (default: a u64).
_ARG_TYPES = {"CAP": _cap, "MODE": _mode}
_ARG_LIMITS = {"SLOT": U32, "FLAGS": U32, "ID": U32, "IRQ": U32, "AS": U32, "TYPE": U64}


def _parse(cmd, words):
    """Match words against cmd.usage: NAME, [NAME] and NAME=VALUE... tokens."""
    spec = cmd.usage.split()[1:]
    args, i = {}, 0
    for tok in spec:
        if tok.endswith("..."):                                  # NAME=VALUE ...
            args["assignments"] = [_assignment(cmd, w) for w in words[i:]]
            i = len(words)
            break
        optional = tok.startswith("[")
        name = tok.strip("[]")
        if i >= len(words):
            if optional:
                continue
            raise KvmError(errno.EINVAL, cmd.name, f"missing {name}; usage: {cmd.usage}")
        parse = _ARG_TYPES.get(name)
        key = name.lower() + ("_" if keyword.iskeyword(name.lower()) else "")
        args[key] = (parse(name, words[i]) if parse else
                              _number(name, words[i], _ARG_LIMITS.get(name, U64)))
        i += 1
    if i < len(words):
        raise KvmError(errno.EINVAL, cmd.name, f"unexpected {words[i]!r}; usage: {cmd.usage}")
    return args


def _assignment(cmd, word):
    name, eq, value = word.partition("=")
    if not eq or not name:
        raise KvmError(errno.EINVAL, cmd.name, f"{word!r}: expected NAME=VALUE; usage: {cmd.usage}")
    return name, _number(name, value)


def _split(line):
    try:
        return shlex.split(line, comments=True)
    except ValueError as e:                                    # unbalanced quotes, a lone escape
        raise KvmError(errno.EINVAL, "command", f"cannot parse {line.strip()!r}: {e}")


def execute(obj, ctx, text):
    """Run each line of text on obj; returns the reply text of the last one."""
    from kvmfs.system import System
    from kvmfs.vcpu import Vcpu
    from kvmfs.vm import Vm
    table = {System: SYSTEM_COMMANDS, Vm: VM_COMMANDS, Vcpu: VCPU_COMMANDS}[type(obj)]
    shell = ctx.as_shell()
    reply = ""
    for line in text.splitlines():
        try:
            words = _split(line)
            if not words:
                continue
            cmd = table.get(words[0])
            if cmd is None:
                raise KvmError(errno.EINVAL, "command", f"unknown command {words[0]!r}; "
                               f"known: {' '.join(sorted(table))} (`help` shows their usage)",)
            args = _parse(cmd, words[1:])
            if isinstance(obj, Vm):
                obj.check_owner(shell, cmd.name)
            elif isinstance(obj, Vcpu):
                obj.vm.check_owner(shell, cmd.name)
            reply = cmd.fn(obj, shell, **args)
        except KvmError as e:
            obj.command_reply = f"error: {errno.errorcode.get(e.errno, e.errno)} {e}\n"
            raise
        obj.command_reply = reply
    return reply


def _call(obj, handler, ctx, arg=0, struct=None):
    """Call an ioctl handler as fs.py does: struct is the FUSE argument buffer."""
    data = ctypes.addressof(struct) if struct is not None else 0
    return handler(ctx, arg, data)


def _help(table):
    def help_(obj, ctx):
        return "".join(f"{c.usage}" + (f"   ({c.ioctl})" if c.ioctl else "") + "\n"
                       for c in table.values())
    return help_


def _table(*commands):
    table = {c.name: c for c in commands}
    table["help"] = Command("help", "help", _help(table), None)
    return table


# --- system ------------------------------------------------------------------------
def sys_create_vm(system, ctx, type=0):
    """The VM belongs to the caller's user (see the module docstring)."""
    return f"vm {_call(system, system.create_vm, ctx, type)}\n"


def sys_destroy_vm(system, ctx, n):
    vm = system.get_vm(n)
    if ctx.uid != 0 and ctx.uid != vm.owner_uid:
        raise KvmError(errno.EPERM, "destroy_vm", f"vm{n} belongs to uid {vm.owner_uid}")
    system.destroy_vm(vm, f"destroy_vm by uid {ctx.uid}")
    return "ok\n"


def sys_check_extension(system, ctx, cap):
    return f"{_call(system, system.check_extension, ctx, cap)}\n"


def sys_api_version(system, ctx):
    return f"{_call(system, system.get_api_version, ctx)}\n"


def sys_vcpu_mmap_size(system, ctx):
    return f"{_call(system, system.get_vcpu_mmap_size, ctx)}\n"


SYSTEM_COMMANDS = _table(
    Command("create_vm", "create_vm [TYPE]", sys_create_vm, "KVM_CREATE_VM"),
    Command("destroy_vm", "destroy_vm N", sys_destroy_vm, None),
    Command("check_extension", "check_extension CAP", sys_check_extension, "KVM_CHECK_EXTENSION"),
    Command("api_version", "api_version", sys_api_version, "KVM_GET_API_VERSION"),
    Command("vcpu_mmap_size", "vcpu_mmap_size", sys_vcpu_mmap_size, "KVM_GET_VCPU_MMAP_SIZE"),
)


# --- VM ----------------------------------------------------------------------------
def vm_create_vcpu(vm, ctx, id):
    return f"vcpu {_call(vm, vm.create_vcpu, ctx, id)}\n"


def vm_set_user_memory_region(vm, ctx, slot, flags, gpa, size, hva=None):
    """Without HVA kvmfs allocates the memory, after the region passed its checks;
    the memory of a deleted or refused kvmfs-allocated region is returned."""
    from kvmfs import memslots
    r = abi.kvm_userspace_memory_region(slot, flags, gpa, size, hva or 0)
    memslots.check_region("set_user_memory_region", slot, flags, gpa, size, r.userspace_addr, False)
    as_id, sid = slot >> 16, slot & 0xFFFF
    old = native.memslot_get(vm.mmu, as_id, sid)
    allocated = None
    if hva is None and size:
        if old is not None and vm.hostmem.allocated_by_kvmfs(old.userspace_addr):
            r.userspace_addr = old.userspace_addr                # a flags change or a move
        else:
            r.userspace_addr = allocated = vm.hostmem.allocate(size)
    try:
        _call(vm, vm.set_user_memory_region, ctx, struct=r)
    except KvmError:
        if allocated is not None:
            vm.hostmem.invalidate(allocated, size)
        raise
    if size == 0 and old is not None and vm.hostmem.allocated_by_kvmfs(old.userspace_addr):
        vm.hostmem.invalidate(old.userspace_addr, old.npages << abi.PAGE_SHIFT)
    return f"ok hva=0x{r.userspace_addr:x}\n"


def vm_get_dirty_log(vm, ctx, slot):
    """The bitmap as hex u64 words, lowest page first."""
    info = [s for a in range(abi.KVM_ADDRESS_SPACE_NUM) for s in vm.slots(a)
            if (s.as_id << 16 | s.id) == slot]
    nwords = (info[0].npages + 63) // 64 if info else 1
    bitmap = (ctypes.c_uint64 * nwords)()
    own = type(ctx).this_process()            # the daemon writes to itself: the bitmap lives here
    r = abi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
    _call(vm, vm.get_dirty_log, own, struct=r)
    return " ".join(f"0x{w:016x}" for w in bitmap) + "\n"


def vm_enable_cap(vm, ctx, cap, arg0=0):
    c = abi.kvm_enable_cap(cap, 0)
    c.args[0] = arg0
    _call(vm, vm.enable_cap, ctx, struct=c)
    return "ok\n"


def vm_set_tss_addr(vm, ctx, addr):
    _call(vm, vm.set_tss_addr, ctx, addr)
    return "ok\n"


def vm_invalidate(vm, ctx, hva, size):
    """An MMU-notifier call: the VMM unmapped or replaced this range."""
    start, end = hva & ~(abi.PAGE_SIZE - 1), (hva + size + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)
    vm.mmu_invalidate_begin(start, end, abi.KVMFS_MMU_EVENT_UNMAP)
    vm.mmu_invalidate_end()
    return "ok\n"


def vm_test_young(vm, ctx, as_, gfn, npages):
    """How many of those pages the guest touched since the last clear."""
    return f"{native.mmu_test_young(vm.mmu, as_, gfn, npages)}\n"


def vm_clear_young(vm, ctx, as_, gfn, npages):
    """The same count, and the accessed state is cleared."""
    return f"{native.mmu_clear_young(vm.mmu, as_, gfn, npages)}\n"


def vm_memslots(vm, ctx):
    return views.render_memslots(vm)


VM_COMMANDS = _table(
    Command("create_vcpu", "create_vcpu ID", vm_create_vcpu, "KVM_CREATE_VCPU"),
    Command("set_user_memory_region", "set_user_memory_region SLOT FLAGS GPA SIZE [HVA]",
            vm_set_user_memory_region, "KVM_SET_USER_MEMORY_REGION"),
    Command("get_dirty_log", "get_dirty_log SLOT", vm_get_dirty_log, "KVM_GET_DIRTY_LOG"),
    Command("enable_cap", "enable_cap CAP [ARG0]", vm_enable_cap, "KVM_ENABLE_CAP"),
    Command("set_tss_addr", "set_tss_addr ADDR", vm_set_tss_addr, "KVM_SET_TSS_ADDR"),
    Command("memslots", "memslots", vm_memslots, None),
    Command("invalidate", "invalidate HVA SIZE", vm_invalidate, None),
    Command("test_young", "test_young AS GFN NPAGES", vm_test_young, None),
    Command("clear_young", "clear_young AS GFN NPAGES", vm_clear_young, None),
)


# --- vCPU --------------------------------------------------------------------------
def _struct_text(st):
    return "".join(f"{n}: 0x{getattr(st, n):x}\n" for n, _ in st._fields_)


def _assign(target, fields_of, name, value):
    obj, _, field = name.rpartition(".")
    holder = getattr(target, obj, None) if obj else target
    if holder is None or obj and obj not in fields_of or field not in dict(type(holder)._fields_):
        raise KvmError(errno.EINVAL, "command", f"no register {name!r}")
    setattr(holder, field, value)


def vcpu_get_regs(vcpu, ctx):
    regs = abi.kvm_regs()
    _call(vcpu, vcpu.get_regs, ctx, struct=regs)
    return _struct_text(regs)


def vcpu_set_regs(vcpu, ctx, assignments):
    """The other registers keep their values."""
    regs = abi.kvm_regs()
    _call(vcpu, vcpu.get_regs, ctx, struct=regs)
    for name, value in assignments:
        _assign(regs, (), name, value)
    _call(vcpu, vcpu.set_regs, ctx, struct=regs)
    return "ok\n"


def vcpu_get_sregs(vcpu, ctx):
    s = abi.kvm_sregs()
    _call(vcpu, vcpu.get_sregs, ctx, struct=s)
    lines = [f"{seg}: base=0x{getattr(s, seg).base:x} limit=0x{getattr(s, seg).limit:x} "
             f"selector=0x{getattr(s, seg).selector:x} type={getattr(s, seg).type} "
             f"l={getattr(s, seg).l} db={getattr(s, seg).db}" for seg in abi.SEGMENTS]
    lines += [f"{n}: 0x{getattr(s, n):x}" for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
    return "\n".join(lines) + "\n"


def vcpu_set_sregs(vcpu, ctx, assignments):
    """cr0=0x11, cs.base=0, cs.selector=0, gdt.limit=0x17, ..."""
    s = abi.kvm_sregs()
    _call(vcpu, vcpu.get_sregs, ctx, struct=s)
    for name, value in assignments:
        _assign(s, abi.SEGMENTS + ("gdt", "idt"), name, value)
    _call(vcpu, vcpu.set_sregs, ctx, struct=s)
    return "ok\n"


def vcpu_setup(vcpu, ctx, mode, rip):
    """A ready state for `mode` (kvmfs.presets), as a VMM sets it before KVM_RUN."""
    s = abi.kvm_sregs()
    _call(vcpu, vcpu.get_sregs, ctx, struct=s)
    regs = presets.apply(lambda gpa, data: vcpu.vm.access_gpa(0, gpa, len(data), data), s, mode, rip)
    _call(vcpu, vcpu.set_sregs, ctx, struct=s)
    _call(vcpu, vcpu.set_regs, ctx, struct=regs)
    return "ok\n"


def exit_text(vcpu, ctx):
    """The exit KVM_RUN left in kvm_run, decoded: reason, RIP and the reason's fields."""
    run = vcpu.kvm_run
    reason = run.exit_reason
    regs = abi.kvm_regs()
    _call(vcpu, vcpu.get_regs, ctx, struct=regs)
    out = [f"exit_reason: {abi.EXIT_REASONS.get(reason, reason)}", f"rip: 0x{regs.rip:x}"]
    if run.flags & abi.KVM_RUN_X86_SMM:
        out.append("smm: 1")
    if reason == abi.KVM_EXIT_IO:
        io = run.io
        data = bytes(vcpu.run_area.buffer[io.data_offset:io.data_offset + io.size * io.count])
        out += [f"direction: {'out' if io.direction else 'in'}", f"size: {io.size}",
                f"port: 0x{io.port:x}", f"count: {io.count}", f"data: {data.hex()}"]
    elif reason == abi.KVM_EXIT_MMIO:
        m = run.mmio
        out += [f"phys_addr: 0x{m.phys_addr:x}", f"len: {m.len}", f"is_write: {m.is_write}",
                f"data: {bytes(m.data)[:m.len].hex()}"]
    elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
        sub = run.internal.suberror
        out += [f"suberror: {sub} ({abi.INTERNAL_ERROR_NAMES.get(sub, 'unknown')})"]
    return "\n".join(out) + "\n"


def vcpu_run(vcpu, ctx):
    """The exit, decoded (see exit_text)."""
    _call(vcpu, vcpu.run, ctx)
    return exit_text(vcpu, ctx)


def vcpu_interrupt(vcpu, ctx, irq):
    _call(vcpu, vcpu.interrupt, ctx, struct=abi.kvm_interrupt(irq))
    return "ok\n"


def vcpu_smi(vcpu, ctx):
    """Taken by the next run."""
    _call(vcpu, vcpu.smi, ctx)
    return "ok\n"


def vcpu_get_vcpu_events(vcpu, ctx):
    ev = abi.kvm_vcpu_events()
    _call(vcpu, vcpu.get_vcpu_events, ctx, struct=ev)
    lines = [f"{part}.{name}: {getattr(getattr(ev, part), name)}"
             for part in ("exception", "interrupt", "nmi", "smi")
             for name, _ in type(getattr(ev, part))._fields_ if name != "pad"]
    return "\n".join(lines + [f"flags: 0x{ev.flags:x}"]) + "\n"


VCPU_COMMANDS = _table(
    Command("get_regs", "get_regs", vcpu_get_regs, "KVM_GET_REGS"),
    Command("set_regs", "set_regs NAME=VALUE...", vcpu_set_regs, "KVM_SET_REGS"),
    Command("get_sregs", "get_sregs", vcpu_get_sregs, "KVM_GET_SREGS"),
    Command("set_sregs", "set_sregs NAME=VALUE...", vcpu_set_sregs, "KVM_SET_SREGS"),
    Command("setup", "setup MODE RIP", vcpu_setup, None),
    Command("run", "run", vcpu_run, "KVM_RUN"),
    Command("interrupt", "interrupt IRQ", vcpu_interrupt, "KVM_INTERRUPT"),
    Command("smi", "smi", vcpu_smi, "KVM_SMI"),
    Command("get_vcpu_events", "get_vcpu_events", vcpu_get_vcpu_events, "KVM_GET_VCPU_EVENTS"),
)


def _check_tables():
    """Every command that names an ioctl names a row of the ioctl table."""
    from kvmfs import ioctls
    names = {row.name for row in ioctls.IOCTLS}
    for table in (SYSTEM_COMMANDS, VM_COMMANDS, VCPU_COMMANDS):
        for c in table.values():
            assert c.ioctl is None or c.ioctl in names, c


_check_tables()
