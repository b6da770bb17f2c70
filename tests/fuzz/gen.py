"""Action generators: a round of fuzz actions from a seeded random.Random.

Generation never looks at the daemon: an action names what it works on by
index ("the r-th open fd of kind K", "the r-th VM this process created"),
resolved when it runs (modulo what exists then).  So a round is a plain JSON
list that replays as it was generated, and any sub-list of it is again a valid
round (what the minimizer relies on).

Pointers inside arguments are symbolic and resolved by the worker:
    ["scr", off]      the thread's writable scratch area (+off; may run off its end)
    ["guard", off]    the PROT_NONE page after scratch
    ["ro", off]       a read-only page
    ["mem", i, off]   the i-th memfd guest memory of the process
    ["null"] / ["abs", value]
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from kvmfs import abi  # noqa: E402

U64 = (1 << 64) - 1

SYSTEM_IOCTLS = ("KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
                 "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST")
VM_IOCTLS = ("KVM_CHECK_EXTENSION", "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG",
             "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
             "KVM_SET_USER_MEMORY_REGION2", "KVM_CREATE_IRQCHIP", "KVM_SET_GSI_ROUTING",
             "KVM_IRQFD", "KVM_IOEVENTFD", "KVM_ENABLE_CAP", "KVM_CLEAR_DIRTY_LOG",
             "KVM_SET_MEMORY_ATTRIBUTES", "KVM_CREATE_GUEST_MEMFD")
VCPU_IOCTLS = tuple(n for n in sorted(abi.IOCTL_NAMES.values())
                    if n not in SYSTEM_IOCTLS + VM_IOCTLS)
FD_KIND_OF = {}
for _n in SYSTEM_IOCTLS:
    FD_KIND_OF.setdefault(_n, "kvm")
for _n in VM_IOCTLS:
    FD_KIND_OF.setdefault(_n, "vmctl")
for _n in VCPU_IOCTLS:
    FD_KIND_OF[_n] = "vcpu"

FD_KINDS = ("kvm", "syscmd", "sysview", "vmctl", "vmcmd", "mem", "vcpu", "vcpurun", "vcpucmd",
            "vmview", "other")

# ioctl types never sent: the VFS handles some itself (FIFREEZE/FITHAW on 'X'),
# and tty ioctls ('T') have no business here.
SKIP_TYPES = (ord("X"), ord("T"), 0x94)

INTS = (0, 1, 2, 3, 7, 8, 15, 16, 63, 64, 255, 256, 4095, 4096, 4097, 0x7FFF, 0xFFFF, 0x10000,
        0x10001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 52) - 4096,
        1 << 52, 1 << 63, U64 - 4095, U64 - 1, U64)


def _ioc(d, t, nr, size):
    return (d << 30) | (size << 16) | (t << 8) | nr


def pick_int(rng):
    r = rng.random()
    if r < 0.5:
        return rng.choice(INTS)
    if r < 0.7:
        return rng.randrange(0, 64)
    if r < 0.85:
        return rng.getrandbits(rng.choice((8, 16, 32, 64)))
    return (-rng.randrange(1, 4096)) & U64


def pick_ptr(rng, size_hint=4096):
    r = rng.random()
    if r < 0.35:
        return ["scr", rng.choice((0, 8, 4096, 65536 - size_hint, 65536 - 8, 65536 - 1,
                                   rng.randrange(0, 65536)))]
    if r < 0.5:
        return ["mem", rng.randrange(4), rng.choice((0, 4096, rng.randrange(0, 1 << 20)))]
    if r < 0.6:
        return ["guard", rng.randrange(0, 4096)]
    if r < 0.7:
        return ["ro", rng.choice((0, 8, 4096 - 8))]
    if r < 0.8:
        return ["null"]
    return ["abs", rng.choice((1, 4096, 0xDEAD0000, 0x00007FFFFFFFF000, 1 << 47, 0xFFFF800000000000,
                               0xFFFFFFFFFFFFF000, U64, rng.getrandbits(64)))]


# --- paths ---------------------------------------------------------------------
VM_SUBS = ("ctl", "cmd", "mem", "as1/mem", "info/memslots", "info/vcpus", "info/stats",
           "info/mmu", "info/dirty", "info/dirty/0.0", "info/dirty/1.0", "info/dirty/0.1",
           "info/vcpu0", "info/vcpu1", "info", "as1", "")
VCPU_SUFFIXES = ("", ".run", ".cmd")
BOGUS = ("vm-1/ctl", "vm01/ctl", "vm99999999999999999999/ctl", "vm0/vcpu-1", "vm0/vcpu01",
         "vm0/info/dirty/9.9", "vm0/info/dirty/x", "vm0/info/dirty/0.0.0", "vm0/info/vcpu99",
         "info/nope", "vm0/as1/nope", "vm0/info/vcpu", "vm0/info/dirty/-1.0", "kvm/x",
         "vm0/info/dirty/00.0", "vm0/info/dirty/" + "9" * 30 + ".0", "vm0/info/vcpu" + "1" * 30)


def vmref(rng):
    if rng.random() < 0.85:
        return ["k", rng.randrange(8)]
    return ["n", rng.choice((0, 1, 2, 1000, 2 ** 31, -1))]


def gen_path(rng):
    r = rng.random()
    if r < 0.1:
        return ["kvm"]
    if r < 0.2:
        return ["cmd"]
    if r < 0.3:
        return ["info", rng.choice(("vms", "caps", "json"))]
    if r < 0.6:
        return ["vm", vmref(rng), rng.choice(VM_SUBS)]
    if r < 0.93:
        return ["vcpu", rng.randrange(8), rng.choice(VCPU_SUFFIXES)]
    return ["raw", rng.choice(BOGUS)]


def gen_flags(rng):
    return rng.choice((os.O_RDWR, os.O_RDWR, os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC,
                       os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_NONBLOCK))


# --- ioctl arguments -----------------------------------------------------------
def slot_value(rng):
    return rng.choice((0, 1, 2, 3, 0x10000, 0x10001, 0x20000, 32763, 32764, 0xFFFF, 0x1FFFF,
                       0xFFFFFFFF, rng.getrandbits(32)))


def region_overrides(rng, v2):
    size = rng.choice((0, 4096, 0x10000, 0x100000, 0x400000, 4095, 0x1001, 1 << 32, 1 << 50,
                       U64 - 4095, 1 << 63, 0x10000))
    gpa = rng.choice((0, 0, 0x1000, 0x100000, 0x200000, 0xFFF, (1 << 52) - 4096, 1 << 52, 1 << 63,
                      U64 - 4095, rng.getrandbits(40) & ~0xFFF))
    flags = rng.choice((0, 0, 1, 2, 3, 4, 5, 8, 0xFFFFFFFF))
    ov = [["u32", 0, slot_value(rng)], ["u32", 4, flags], ["u64", 8, gpa], ["u64", 16, size],
          ["ptr", 24, pick_ptr(rng) if rng.random() < 0.4 else ["mem", rng.randrange(4), 0]]]
    if v2:
        ov += [["u64", 32, pick_int(rng)], ["u32", 40, pick_int(rng) & 0xFFFFFFFF]]
    return ov


def gen_ioctl_arg(rng, name, size):
    """Field overrides for a known ioctl's argument (bytes otherwise random/zero)."""
    ov = []
    extra = 0            # bytes after the fixed struct (variable-length arrays)
    if name == "KVM_GET_DIRTY_LOG":
        ov = [["u32", 0, slot_value(rng)], ["ptr", 8, pick_ptr(rng)]]
    elif name in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2"):
        ov = region_overrides(rng, name.endswith("2"))
    elif name == "KVM_CLEAR_DIRTY_LOG":
        ov = [["u32", 0, slot_value(rng)], ["u32", 4, rng.choice((0, 1, 63, 64, 128, 256, 4096, 0xFFFFFFFF))],
              ["u64", 8, rng.choice((0, 0, 64, 1, 128, 1 << 40, U64 - 63))], ["ptr", 16, pick_ptr(rng)]]
    elif name == "KVM_ENABLE_CAP":
        ov = [["u32", 0, rng.choice((abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,) * 3 + (pick_int(rng) & 0xFFFFFFFF,))],
              ["u32", 4, rng.choice((0, 0, 1))], ["u64", 8, rng.choice((0, 1, 2, 3, 4, U64))]]
    elif name in ("KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_SUPPORTED_CPUID"):
        n = rng.choice((0, 1, 2, 8, 64, 255, 256, 257, 0x7FFFFFFF, 0xFFFFFFFF))
        ov = [["u32", 0, n]]
        extra = 40 * min(n, rng.choice((0, 1, 4, 64, 256)))
    elif name in ("KVM_GET_MSRS", "KVM_SET_MSRS"):
        n = rng.choice((0, 1, 2, 3, 16, 1024, 1025, 0xFFFFFFFF))
        ov = [["u32", 0, n]]
        k = min(n, rng.choice((0, 1, 3, 16, 64)))
        extra = 16 * k
        for i in range(min(k, 16)):
            ov.append(["u32", 8 + 16 * i, rng.choice((0x10, 0x1B, 0x9E, 0x174, 0x175, 0x176, 0x277,
                                                      0xC0000080, 0xC0000081, 0xC0000100, 0xC0000101,
                                                      0xC0000102, 0xC0000103, rng.getrandbits(32)))])
    elif name == "KVM_GET_MSR_INDEX_LIST":
        n = rng.choice((0, 1, 4, 64, 0xFFFFFFFF))
        ov = [["u32", 0, n]]
        extra = 4 * min(n, 64)
    elif name == "KVM_SET_IDENTITY_MAP_ADDR":
        ov = [["u64", 0, pick_int(rng)]]
    elif name == "KVM_INTERRUPT":
        ov = [["u32", 0, rng.choice((0, 8, 32, 255, 256, 0xFFFFFFFF))]]
    elif name == "KVM_SET_GUEST_DEBUG":
        ov = [["u32", 0, rng.choice((0, 1, 3, 0x10003, 0xFFFFFFFF, rng.getrandbits(32)))]]
    return ov, extra


def gen_ioctl(rng):
    r = rng.random()
    if r < 0.6:
        name = rng.choice(sorted(abi.IOCTL_NAMES.values()))
        cmd = getattr(abi, name)
        kind = FD_KIND_OF[name] if rng.random() < 0.85 else rng.choice(FD_KINDS)
    else:
        name = None
        d = rng.randrange(4)
        t = abi.KVMIO if r < 0.85 else rng.choice([x for x in range(256) if x not in SKIP_TYPES])
        nr = rng.randrange(256)
        size = 0 if d == 0 else rng.choice((1, 4, 8, 16, 24, 64, 312, 416, 4096, 4096,
                                            rng.randrange(1, 1 << 14)))
        cmd = _ioc(d, t, nr, size)
        kind = rng.choice(FD_KINDS)
    size = abi.ioc_size(cmd)
    act = {"op": "ioctl", "kind": kind, "fd": rng.randrange(16), "cmd": cmd}
    if abi.ioc_dir(cmd) == abi.IOC_NONE and rng.random() < 0.9:
        act["arg"] = {"t": "int", "v": pick_int(rng) if name not in ("KVM_CREATE_VCPU", "KVM_RUN")
                      or rng.random() < 0.5 else rng.randrange(4)}
        if name == "KVM_CHECK_EXTENSION" and rng.random() < 0.5:
            act["arg"]["v"] = rng.choice(sorted(abi.CAPS))
        return act
    ov, extra = gen_ioctl_arg(rng, name, size) if name else ([], 0)
    if name == "KVM_RUN":
        ov, extra = [], 0
    place = rng.choice((["scr", 0],) * 6 + (["end", 0], ["end", rng.choice((1, 8, 40))],
                                            ["ro", 0], ["null"], ["guard", 0]))
    act["arg"] = {"t": "buf", "len": size + extra, "fill": rng.choice(("zero", "rand", "rand", "pat")),
                  "seed": rng.getrandbits(32), "ov": ov, "place": place}
    return act


# --- text commands --------------------------------------------------------------
def _num(rng):
    r = rng.random()
    if r < 0.5:
        return str(rng.choice((0, 1, 2, 4096, 0x10000, 0x100000)))
    return rng.choice(("-1", "-4096", "0x" + "f" * 16, "0x" + "f" * 40, "9" * 50, "9" * 5000,
                       "0x", "0b102", "1e5", "nan", "", "''", "0o777", "1_000", "\u0661\u0662",
                       "+5", "- 1", "0x-1", str(1 << 64), str(-(1 << 63)), "0" * 20 + "1",
                       hex(rng.getrandbits(64)), str(rng.randrange(-10, 100))))


def _word(rng, words):
    r = rng.random()
    if r < 0.85:
        return rng.choice(words)
    return rng.choice(("", "frobnicate", "CREATE_VM", "run\x00", "\xff\xfe", "'", '"', "\\",
                       "run;run", "x" * 10000))


SYS_CMDS = ("create_vm", "check_extension", "api_version")
VM_CMDS = ("create_vcpu", "set_user_memory_region", "get_dirty_log", "enable_cap", "set_tss_addr",
           "memslots", "invalidate", "test_young", "clear_young")
VCPU_CMDS = ("get_regs", "set_regs", "get_sregs", "set_sregs", "run", "interrupt", "smi",
             "get_vcpu_events")
REGS = [n for n, _ in abi.kvm_regs._fields_]
SREGS = ([f"{s}.{f}" for s in abi.SEGMENTS for f in ("base", "limit", "selector", "type", "l", "db",
                                                      "present", "s", "g")]
         + ["cr0", "cr3", "cr4", "efer", "apic_base", "gdt.base", "gdt.limit", "idt.limit",
            "cr8", "cr2", "interrupt_bitmap", "foo.bar", ".x", "cs.", "cs.padding"])


def _args(rng, word):
    n = rng.choice((0, 1, 2, 3, 4, 5, 6))
    if word in ("set_regs", "set_sregs"):
        names = REGS if word == "set_regs" else SREGS
        out = []
        for _ in range(n):
            a = rng.choice(names + ["bogus"]) + rng.choice(("=", "=", "=", "", "==", ":")) + _num(rng)
            out.append(a)
        return out
    if word == "check_extension" or word == "enable_cap":
        caps = [k[len("KVM_CAP_"):].lower() for k in dir(abi) if k.startswith("KVM_CAP_")]
        return [rng.choice(caps + ["nosuchcap", "__class__", "_"]) if rng.random() < 0.6 else _num(rng)] + \
            [_num(rng) for _ in range(rng.randrange(3))]
    return [_num(rng) for _ in range(n)]


def gen_line(rng, words):
    w = _word(rng, words)
    line = " ".join([w] + _args(rng, w))
    r = rng.random()
    if r < 0.06:
        line += " '" + "unbalanced"
    elif r < 0.1:
        line += ' "x'
    elif r < 0.12:
        line += " \\"
    elif r < 0.14:
        line = "# " + line
    elif r < 0.16:
        line = line.replace(" ", "\t")
    elif r < 0.18:
        line += " \x00junk"
    return line


def gen_text(rng, words):
    n = rng.choice((1, 1, 1, 2, 3, 50))
    text = "\n".join(gen_line(rng, words) for _ in range(n))
    if rng.random() < 0.8:
        text += rng.choice(("\n", "\r\n", "\n\n"))
    data = text.encode("utf-8", "surrogateescape")
    if rng.random() < 0.05:
        data += bytes([0xff, 0xc3, 0x28, 0x80])
    return data.hex()


def gen_cmd(rng):
    r = rng.random()
    if r < 0.25:
        target, words = ["cmd"], SYS_CMDS
    elif r < 0.6:
        target, words = ["vm", vmref(rng), "cmd"], VM_CMDS
    else:
        target, words = ["vcpu", rng.randrange(8), ".cmd"], VCPU_CMDS
    if rng.random() < 0.1:
        words = SYS_CMDS + VM_CMDS + VCPU_CMDS
    return {"op": "write_cmd", "target": target, "hex": gen_text(rng, words),
            "keep": rng.random() < 0.3, "read": rng.random() < 0.7}


# --- guests --------------------------------------------------------------------
GUEST_CODES = {
    "spin": "ebfe",                                   # jmp $
    "hlt": "f4",
    "out": "b041e610ebfa",                            # mov al,0x41; out 0x10,al; jmp back
    "in": "e410ebfc",                                 # in al,0x10; jmp back
    "mmio": "a10000f0ebfb",                           # mov ax,[0xf000] (segment 0 -> gpa 0xf000 in slot)
    "mmio_hole": "b800e08ed8a10000ebf6",              # mov ax,0xe000; mov ds,ax; mov ax,[0] (gpa 0xe0000: hole)
    "write_loop": "fe060020ebfa",                     # inc byte [0x2000]; jmp
    "triple": "fa0f0116f010cd03",                     # cli; lidt [0x10f0]; int3
}


def gen_guest(rng):
    kind = rng.choice(sorted(GUEST_CODES) + ["rand", "rand"])
    code = GUEST_CODES[kind] if kind != "rand" else bytes(
        rng.getrandbits(8) for _ in range(rng.randrange(1, 64))).hex()
    return {"op": "setup_guest", "code": code, "vcpus": rng.choice((1, 1, 2)),
            "log_dirty": rng.random() < 0.3, "smm_slot": rng.random() < 0.3}


def gen_run(rng):
    return {"op": "run", "vcpu": rng.randrange(8), "delay_ms": rng.choice((0, 1, 5, 20, 50, 150)),
            "imm": rng.random() < 0.15, "runs": rng.choice((1, 1, 2, 5))}


# --- a round -------------------------------------------------------------------
def gen_simple(rng):
    r = rng.random()
    if r < 0.12:
        return {"op": "open", "path": gen_path(rng), "flags": gen_flags(rng)}
    if r < 0.18:
        return {"op": "close", "kind": rng.choice(FD_KINDS + (None,) * 4), "fd": rng.randrange(16)}
    if r < 0.2:
        return {"op": "dup", "fd": rng.randrange(16)}
    if r < 0.42:
        return gen_ioctl(rng)
    if r < 0.47:
        return {"op": "ior_probe", "kind": rng.choice(FD_KINDS), "fd": rng.randrange(16),
                "type": rng.choice((abi.KVMIO, abi.KVMIO, rng.randrange(256))), "nr": rng.randrange(256)}
    if r < 0.55:
        return {"op": rng.choice(("pread", "pwrite")), "kind": rng.choice(("mem", "mem", "vcpurun", None)),
                "fd": rng.randrange(16),
                "off": rng.choice((0, 0x1000, 0xFFF, 0xFFFF, 0x10000, 0xF0000, 0x100000, 1 << 40,
                                   (1 << 63) - 1, (1 << 63) - 4096, (1 << 52) - 1, rng.randrange(1 << 21))),
                "size": rng.choice((0, 1, 8, 4096, 4097, 65536, 131072, rng.randrange(1, 20000))),
                "seed": rng.getrandbits(32)}
    if r < 0.6:
        return {"op": "mmap", "kind": rng.choice(("vcpurun", "vcpurun", "vcpu", "mem", None)),
                "fd": rng.randrange(16), "len": rng.choice((4096, 12288, 16384, 1 << 20)),
                "off": rng.choice((0, 0, 4096, 8192, 12288)), "prot": rng.choice((1, 3, 3)),
                "shared": rng.random() < 0.8}
    if r < 0.63:
        return {"op": "touch", "map": rng.randrange(8), "off": rng.choice((0, 8, 4096, 8192, 12287, 12288, 16383)),
                "write": rng.random() < 0.5, "seed": rng.getrandbits(16)}
    if r < 0.64:
        return {"op": "munmap", "map": rng.randrange(8)}
    if r < 0.72:
        return {"op": "read_view", "path": rng.choice(
            (["info", "json"], ["info", "vms"], ["info", "caps"], ["vm", vmref(rng), "info/memslots"],
             ["vm", vmref(rng), "info/vcpus"], ["vm", vmref(rng), "info/stats"],
             ["vm", vmref(rng), "info/mmu"], ["vm", vmref(rng), "info/dirty/0.0"],
             ["vm", vmref(rng), "info/vcpu0"], ["vm", vmref(rng), "info/dirty"], ["raw", rng.choice(BOGUS)]))}
    if r < 0.73:
        return {"op": "walk"}
    if r < 0.83:
        return gen_cmd(rng)
    if r < 0.86:
        return {"op": "create_vm", "via": rng.choice(("ioctl", "cmd")), "type": rng.choice((0, 0, 0, 1, 63, 64, U64)),
                "open_ctl": rng.random() < 0.8}
    if r < 0.89:
        return {"op": "create_vcpu", "vm": vmref(rng), "id": rng.choice((0, 1, 2, 3, 4095, 4096, rng.randrange(64))),
                "via": rng.choice(("ioctl", "ioctl", "cmd"))}
    if r < 0.9:
        return {"op": "alloc_mem", "size": rng.choice((0x10000, 0x100000, 0x200000))}
    if r < 0.93:
        return gen_run(rng)
    if r < 0.95:
        return {"op": "close_vm", "vm": vmref(rng)}
    if r < 0.96:
        return {"op": "sleep", "ms": rng.choice((1, 10, 50))}
    if r < 0.98:
        return gen_guest(rng)
    return {"op": "invalidate_mem", "mem": rng.randrange(4)}


def gen_race(rng):
    """A vCPU running a looping guest in one thread while the others close its fds,
    create and destroy VMs and read the views."""
    runner = [gen_run(rng) for _ in range(rng.randrange(1, 4))]
    for a in runner:
        a["vcpu"] = -1                       # the most recently created vCPU
    others = []
    for _ in range(rng.randrange(3, 12)):
        r = rng.random()
        if r < 0.25:
            others.append({"op": "read_view", "path": ["info", "json"]})
        elif r < 0.35:
            others.append({"op": "read_view", "path": ["vm", ["k", -1], rng.choice(("info/vcpu0", "info/vcpus", "info/stats"))]})
        elif r < 0.5:
            others.append({"op": "close", "kind": rng.choice(("vcpu", "vmctl", "vcpurun", None)), "fd": -1})
        elif r < 0.6:
            others.append({"op": "close_vm", "vm": ["k", -1]})
        elif r < 0.75:
            others.append({"op": "create_vm", "via": "ioctl", "type": 0, "open_ctl": True})
            if rng.random() < 0.5:
                others.append({"op": "close_vm", "vm": ["k", -1]})
        elif r < 0.85:
            others.append(gen_cmd(rng))
        else:
            others.append({"op": "sleep", "ms": rng.choice((1, 5, 20))})
    body = [gen_guest(rng)]
    body[0]["code"] = rng.choice((GUEST_CODES["spin"], GUEST_CODES["spin"], GUEST_CODES["out"],
                                  GUEST_CODES["write_loop"]))
    return body + [{"op": "thread", "actions": runner}] + others + [{"op": "join"}]


def gen_round(rng, n_actions=40, depth=0):
    actions = []
    if depth == 0 and rng.random() < 0.7:
        actions.append(gen_guest(rng))
    while len(actions) < n_actions:
        r = rng.random()
        if r < 0.06 and depth == 0:
            actions.extend(gen_race(rng))
        elif r < 0.1 and depth < 2:
            actions.append({"op": "thread", "actions": gen_round(rng, rng.randrange(2, 10), depth + 1)})
        elif r < 0.13 and depth < 2:
            actions.append({"op": "fork", "wait": rng.random() < 0.7,
                            "actions": gen_round(rng, rng.randrange(2, 10), depth + 1)})
        else:
            actions.append(gen_simple(rng))
    if depth == 0:
        if rng.random() < 0.15:
            actions.append({"op": "orphan", "actions": gen_round(rng, rng.randrange(2, 10), 1)})
        else:
            actions.append({"op": "join"})
    return actions
