"""Unicorn alone (Python binding, no kvmfs): the emulation anchors of `make bench`.

The same guest loops as bench/bench_guest.c, run with uc.emu_start() on host
memory mapped with mem_map_ptr (flat: no guest paging, default TLB):

  compute MODE ITERS REPS    ns per guest instruction of {add, xor, dec, jnz} (MODE 16|64)
  memloop ITERS REPS         ns per guest instruction of {add [rdi+rsi],eax; add esi,64;
                             and esi,0xfffff; dec ecx; jnz} over 1 MiB (64-bit)
  touch MIB REPS             ns per page of one write per 4 KiB page: unicorn's own TLB
                             fill with no hook (TLB flushed before each pass, memory
                             already written once by the host)
  codehook MODE ITERS REPS SO  compute with an empty C UC_HOOK_CODE over all addresses
                             (SO = built bench/uc_codehook.c): the cost of a
                             per-instruction hook alone
Prints one line per repetition.
"""
import ctypes
import mmap
import struct
import sys
import time

from unicorn import Uc, UC_ARCH_X86, UC_MODE_16, UC_MODE_64, UC_PROT_ALL, UC_HOOK_CODE
from unicorn.unicorn_const import UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE
from unicorn.x86_const import UC_X86_REG_ECX, UC_X86_REG_RDI, UC_X86_REG_ESI
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.unicorn_py3.arch.types import uc_hook_h

CODE = 0x1000
LOW = 2 << 20
DATA = 0x40000000


class Guest:
    def __init__(self, mode, data_size=0):
        self.uc = Uc(UC_ARCH_X86, mode)
        self.low = mmap.mmap(-1, LOW)
        self.uc.mem_map_ptr(0, LOW, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(self.low)))
        if data_size:
            self.data = mmap.mmap(-1, data_size)
            for o in range(0, data_size, 4096):        # host pages present
                self.data[o] = 1
            self.uc.mem_map_ptr(DATA, data_size, UC_PROT_ALL,
                                ctypes.addressof(ctypes.c_char.from_buffer(self.data)))

    def load(self, code):
        self.low[CODE:CODE + len(code)] = code
        self.uc.ctl_remove_cache(CODE, CODE + len(code))
        return CODE + len(code) - 1                    # the final hlt is not run


def code_compute(mode):
    if mode == UC_MODE_16:
        return bytes([0x66, 0x01, 0xC8, 0x66, 0x31, 0xC3, 0x66, 0x49, 0x75, 0xF6, 0xF4])
    return bytes([0x01, 0xC8, 0x31, 0xC3, 0xFF, 0xC9, 0x75, 0xF8, 0xF4])


def code_memloop():
    return bytes([0x01, 0x04, 0x37, 0x83, 0xC6, 0x40, 0x81, 0xE6, 0xFF, 0xFF, 0x0F, 0x00,
                  0xFF, 0xC9, 0x75, 0xF0, 0xF4])


def code_touch(npages):
    c = bytearray(b"\x48\xbf" + struct.pack("<Q", DATA) + b"\x48\xb9" + struct.pack("<Q", npages))
    loop = len(c)
    c += b"\x88\x07" + b"\x48\x81\xc7" + struct.pack("<I", 4096) + b"\x48\xff\xc9"
    c += bytes([0x75, (loop - (len(c) + 2)) & 0xFF, 0xF4])
    return bytes(c)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compute(mode, iters, reps, hook_so=None):
    g = Guest(UC_MODE_16 if mode == "16" else UC_MODE_64)
    end = g.load(code_compute(g.uc._mode))
    if hook_so:
        lib = ctypes.CDLL(hook_so)
        h = uc_hook_h()
        fp = ctypes.cast(lib.uc_codehook_empty, ctypes.c_void_p)
        err = uclib.uc_hook_add(g.uc._uch, ctypes.byref(h), UC_HOOK_CODE, fp, None,
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise RuntimeError("uc_hook_add: %d" % err)
    for r in range(reps + 1):
        g.uc.reg_write(UC_X86_REG_ECX, iters)
        t = timed(lambda: g.uc.emu_start(CODE, end))
        if r:
            print("%.4f" % (t * 1e9 / (4 * iters)), flush=True)


def memloop(iters, reps):
    g = Guest(UC_MODE_64, 1 << 20)
    end = g.load(code_memloop())
    for r in range(reps + 1):
        g.uc.reg_write(UC_X86_REG_ECX, iters)
        g.uc.reg_write(UC_X86_REG_RDI, DATA)
        g.uc.reg_write(UC_X86_REG_ESI, 0)
        t = timed(lambda: g.uc.emu_start(CODE, end))
        if r:
            print("%.4f" % (t * 1e9 / (5 * iters)), flush=True)


def touch(mib, reps):
    size = mib << 20
    npages = size >> 12
    g = Guest(UC_MODE_64, size)
    end = g.load(code_touch(npages))
    g.uc.emu_start(CODE, end)                          # unicorn's first touch, not reported
    for _ in range(reps):
        g.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        t = timed(lambda: g.uc.emu_start(CODE, end))
        print("%.1f" % (t * 1e9 / npages), flush=True)


def main(argv):
    cmd = argv[0]
    if cmd == "compute":
        compute(argv[1], int(argv[2]), int(argv[3]))
    elif cmd == "codehook":
        compute(argv[1], int(argv[2]), int(argv[3]), argv[4])
    elif cmd == "memloop":
        memloop(int(argv[1]), int(argv[2]))
    elif cmd == "touch":
        touch(int(argv[1]), int(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
