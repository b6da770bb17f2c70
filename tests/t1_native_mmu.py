"""t1: the native MMU (native/mmu.c, walk.c, dirty.c) through cffi, no FUSE, no vCPU.

Covers memslot rules (spec 7.3), host memory and guest-physical copies, the
guest page walk of every paging mode, sptes and dirty logging by write
protection (spec 8), zaps, the remote-flush protocol and aging.  Guest memory
is an anonymous mmap registered as host memory at its own address (the test
plays both the VMM and the daemon).
"""
import contextlib
import errno
import mmap
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvmfs import abi  # noqa: E402
from kvmfs._kvmfs_native import ffi, lib  # noqa: E402

PAGE = abi.PAGE_SIZE
LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
RO = abi.KVM_MEM_READONLY
GMEM = abi.KVM_MEM_GUEST_MEMFD
MANUAL = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = abi.KVM_DIRTY_LOG_INITIALLY_SET
P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_SMEP = 1 << 4, 1 << 5, 1 << 20
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
R_, W_, X_ = 1, 2, 4           # UC_PROT_*
READ, WRITE, FETCH = lib.KVMFS_ACC_READ, lib.KVMFS_ACC_WRITE, lib.KVMFS_ACC_FETCH
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16


@pytest.fixture
def mmu():
    m = lib.kvmfs_mmu_new()
    assert m != ffi.NULL
    yield m
    lib.kvmfs_mmu_free(m)


class HostMem:
    """Anonymous memory registered as host memory at its own address."""

    def __init__(self, mmu, size, register=True):
        self.mmu = mmu
        self.map = mmap.mmap(-1, size)
        self.size = size
        self.cbuf = ffi.from_buffer(self.map)   # lives as long as self
        self.hva = int(ffi.cast("uintptr_t", self.cbuf))
        if register:
            assert lib.kvmfs_hostmem_add(mmu, self.hva, size, self.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == 0

    def u64(self, off):
        return int.from_bytes(self.map[off:off + 8], "little")

    def set64(self, off, val):
        self.map[off:off + 8] = val.to_bytes(8, "little")

    def u32(self, off):
        return int.from_bytes(self.map[off:off + 4], "little")

    def set32(self, off, val):
        self.map[off:off + 4] = val.to_bytes(4, "little")


def mset(mmu, slot, gpa, size, hva, flags=0, as_id=0):
    return lib.kvmfs_memslot_set(mmu, as_id, slot, flags, gpa, size, hva, ffi.NULL)


def info(mmu, slot, as_id=0):
    out = ffi.new("struct kvmfs_slot_info *")
    rc = lib.kvmfs_memslot_get(mmu, as_id, slot, out)
    return out if rc == 0 else rc


def paging(cr0=0, cr3=0, cr4=0, efer=0, cpl=0, as_id=0):
    pg = ffi.new("struct kvmfs_paging *")
    pg.cr0, pg.cr3, pg.cr4, pg.efer, pg.cpl, pg.as_id = cr0, cr3, cr4, efer, cpl, as_id
    return pg


def xl(mmu, vaddr, access=READ, pg=None):
    out = ffi.new("struct kvmfs_xlate *")
    assert lib.kvmfs_mmu_translate(mmu, pg or paging(), vaddr, access, out) == 0
    return out


def stats(mmu):
    s = ffi.new("struct kvmfs_mmu_stats *")
    lib.kvmfs_mmu_get_stats(mmu, s)
    return s


def sptes(mmu):
    n = lib.kvmfs_mmu_list_sptes(mmu, ffi.NULL, 0)
    out = ffi.new("struct kvmfs_spte_info[]", max(n, 1))
    assert lib.kvmfs_mmu_list_sptes(mmu, out, n) == n
    return {(out[i].as_id, out[i].gfn): out[i].flags for i in range(n)}


def dirty(mmu, slot, npages, as_id=0, get=True):
    nbytes = (npages + 63) // 64 * 8
    buf = ffi.new("char[]", nbytes)
    fn = lib.kvmfs_dirty_get_log if get else lib.kvmfs_dirty_peek
    rc = fn(mmu, as_id, slot, buf, nbytes)
    if rc < 0:
        return rc
    return int.from_bytes(ffi.buffer(buf, nbytes)[:], "little")


def clear(mmu, slot, first, num, mask, as_id=0):
    nbytes = max((num + 63) // 64 * 8, 8)
    return lib.kvmfs_dirty_clear_log(mmu, as_id, slot, first, num,
                                     ffi.new("char[]", mask.to_bytes(nbytes, "little")))


# ------------------------------------------------------------------ memslots --

@pytest.mark.parametrize("as_id", [0, 1])
def test_memslot_rules(mmu, as_id):
    M = lambda *a, **k: mset(mmu, *a, as_id=as_id, **k)  # noqa: E731
    hva = 0x7f0000000000
    assert M(0, 0, 0, hva) == -errno.EINVAL                        # delete absent
    assert M(0, 0x10000, 0x4000, hva) == lib.KVMFS_MR_CREATE
    assert M(0, 0x10000, 0x4000, hva) == lib.KVMFS_MR_NONE          # identical
    assert M(1, 0x12000, 0x1000, hva) == -errno.EEXIST             # overlap
    assert M(1, 0xf000, 0x2000, hva) == -errno.EEXIST              # overlap from below
    assert M(1, 0x0, 0x100000, hva) == -errno.EEXIST               # covers it
    assert M(1, 0x14000, 0x1000, hva) == lib.KVMFS_MR_CREATE        # adjacent above, same hva
    assert M(2, 0xf000, 0x1000, hva) == lib.KVMFS_MR_CREATE         # adjacent below
    assert M(0, 0x10000, 0x4000, hva + PAGE) == -errno.EINVAL       # other hva
    assert M(0, 0x10000, 0x5000, hva) == -errno.EINVAL              # resize
    assert M(0, 0x10000, 0x4000, hva, RO) == -errno.EINVAL          # READONLY toggled
    assert M(0, 0x10000, 0x4000, hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
    assert info(mmu, 0, as_id).flags == LOG
    assert M(0, 0x11000, 0x4000, hva, LOG) == -errno.EEXIST         # move onto slot 1
    assert M(0, 0x20000, 0x4000, hva, 0) == lib.KVMFS_MR_MOVE       # move + logging off
    assert M(0, 0x1e000, 0x4000, hva, 0) == lib.KVMFS_MR_MOVE       # overlapping its own old range
    i = info(mmu, 0, as_id)
    assert (i.base_gfn, i.npages, i.userspace_addr, i.flags, i.as_id) == (0x1e, 4, hva, 0, as_id)
    assert M(0, 0, 0, 0) == lib.KVMFS_MR_DELETE                     # other fields ignored
    assert info(mmu, 0, as_id) == -errno.ENOENT
    assert M(5, 1 << 52, PAGE, hva) == -errno.EINVAL                # beyond 52-bit gpa
    assert M(abi.KVM_USER_MEM_SLOTS, 0, PAGE, hva) == -errno.EINVAL
    # guest_memfd slots are immutable
    assert M(3, 0x40000, 0x1000, hva, GMEM) == lib.KVMFS_MR_CREATE
    assert M(3, 0x40000, 0x1000, hva, GMEM) == -errno.EINVAL
    assert M(3, 0x50000, 0x1000, hva, GMEM) == -errno.EINVAL
    assert M(3, 0x40000, 0x1000, hva, 0) == -errno.EINVAL
    assert M(3, 0, 0, 0) == lib.KVMFS_MR_DELETE
    assert lib.kvmfs_memslot_count(mmu, as_id) == 2
    assert lib.kvmfs_memslot_count(mmu, 1 - as_id) == 0


def test_address_spaces_independent(mmu):
    assert mset(mmu, 0, 0, 0x10000, 0x1000000, as_id=0) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 0, 0, 0x10000, 0x2000000, as_id=1) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 0x8000, 0x1000, 0x1000000, as_id=1) == -errno.EEXIST
    assert info(mmu, 0, 0).userspace_addr == 0x1000000
    assert info(mmu, 0, 1).userspace_addr == 0x2000000
    g = lib.kvmfs_memslot_generation(mmu)
    assert mset(mmu, 0, 0, 0, 0, as_id=1) == lib.KVMFS_MR_DELETE
    assert lib.kvmfs_memslot_generation(mmu) > g
    assert info(mmu, 0, 0).npages == 16


def test_many_slots(mmu):
    n = 10000
    order = list(range(n))
    order = order[::2] + order[1::2][::-1]       # not in gpa order
    t0 = time.perf_counter()
    for i in order:
        assert mset(mmu, i, i * 2 * PAGE, PAGE, 0x10000000 + i * PAGE) == lib.KVMFS_MR_CREATE
    t_create = time.perf_counter() - t0
    assert lib.kvmfs_memslot_count(mmu, 0) == n
    out = ffi.new("struct kvmfs_slot_info[]", n)
    assert lib.kvmfs_memslot_list(mmu, 0, out, n) == n
    assert [out[i].id for i in range(n)] == list(range(n))           # sorted by gpa
    assert mset(mmu, n, 3 * 2 * PAGE, PAGE, 0x1) == -errno.EEXIST
    assert mset(mmu, n, 3 * 2 * PAGE + PAGE, PAGE, 0) == lib.KVMFS_MR_CREATE   # in a gap
    # lookups through the copy path land in the right slot
    assert lib.kvmfs_mmu_read_gpa(mmu, 0, 5 * PAGE, ffi.new("char[]", 1), 1, ffi.new("uint64_t *")) == -errno.EIO
    miss = ffi.new("uint64_t *")
    assert lib.kvmfs_mmu_read_gpa(mmu, 0, 4444 * 2 * PAGE, ffi.new("char[]", 1), 1, miss) == 0
    assert miss[0] == 0x10000000 + 4444 * PAGE
    t0 = time.perf_counter()
    for i in order:
        assert mset(mmu, i, 0, 0, 0) == lib.KVMFS_MR_DELETE
    t_delete = time.perf_counter() - t0
    assert lib.kvmfs_memslot_count(mmu, 0) == 1
    print(f"10000 slots: {1e6 * t_create / n:.1f} us per create, {1e6 * t_delete / n:.1f} us per delete")


# ------------------------------------------------ host memory and gpa copy --

def test_hostmem_and_gpa_copy(mmu):
    a = HostMem(mmu, 8 * PAGE)
    b = HostMem(mmu, 4 * PAGE, register=False)
    assert lib.kvmfs_hostmem_add(mmu, a.hva, PAGE, a.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == -errno.EEXIST
    assert lib.kvmfs_hostmem_add(mmu, a.hva + 1, PAGE, a.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == -errno.EINVAL
    # slot 0: gpa 0..4 pages -> a[4..8]; slot 1: gpa 4..8 pages -> b (not registered yet)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva + 4 * PAGE) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 4 * PAGE, 4 * PAGE, b.hva) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 2, 16 * PAGE, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    miss = ffi.new("uint64_t *")
    data = bytes(range(256)) * 64                          # 4 pages
    # write across slot 0 -> slot 1: stops at b's unresolved memory
    n = lib.kvmfs_mmu_write_gpa(mmu, 0, 2 * PAGE + 100, data, len(data), miss)
    assert n == 2 * PAGE - 100 and miss[0] == 0
    assert a.map[6 * PAGE + 100:8 * PAGE] == data[:n]
    n = lib.kvmfs_mmu_write_gpa(mmu, 0, 4 * PAGE, data, len(data), miss)
    assert n == 0 and miss[0] == b.hva
    assert lib.kvmfs_hostmem_add(mmu, b.hva, b.size, b.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == 0
    n = lib.kvmfs_mmu_write_gpa(mmu, 0, 2 * PAGE + 100, data, len(data), miss)
    assert n == len(data)
    assert b.map[:2 * PAGE + 100] == data[2 * PAGE - 100:]
    buf = ffi.new("char[]", 9 * PAGE)
    # read stops at the hole after slot 1 (gpa 8 pages)
    assert lib.kvmfs_mmu_read_gpa(mmu, 0, 2 * PAGE + 100, buf, 9 * PAGE, miss) == 6 * PAGE - 100
    assert ffi.buffer(buf, len(data))[:] == data
    assert lib.kvmfs_mmu_read_gpa(mmu, 0, 8 * PAGE, buf, 1, miss) == -errno.EIO
    assert lib.kvmfs_mmu_read_gpa(mmu, 1, 0, buf, 1, miss) == -errno.EIO    # other AS
    # slot 2 aliases a[0..4]: host memory shared by two places
    a.map[0:4] = b"abcd"
    assert lib.kvmfs_mmu_read_gpa(mmu, 0, 16 * PAGE, buf, 4, miss) == 4
    assert ffi.buffer(buf, 4)[:] == b"abcd"
    hl = ffi.new("struct kvmfs_hostmem_info[]", 4)
    assert lib.kvmfs_hostmem_list(mmu, hl, 4) == 2
    assert (hl[0].hva, hl[0].size, hl[1].hva) == (a.hva, a.size, b.hva)
    assert hl[0].uphys >= 1 << 40 and hl[1].uphys >= hl[0].uphys + a.size
    assert hl[0].uphys % PAGE == 0 and hl[1].uphys < 1 << 51
    assert ffi.cast("uintptr_t", hl[1].ptr) == b.hva


def test_hostmem_remove_zaps(mmu):
    a = HostMem(mmu, 4 * PAGE)
    b = HostMem(mmu, 4 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 4 * PAGE, 4 * PAGE, b.hva) == lib.KVMFS_MR_CREATE
    for gpa in (0, PAGE, 4 * PAGE, 5 * PAGE):
        assert xl(mmu, gpa).kind == lib.KVMFS_XL_OK
    assert len(sptes(mmu)) == 4
    ptrs, sizes = ffi.new("void *[]", 4), ffi.new("uint64_t[]", 4)
    assert lib.kvmfs_hostmem_remove(mmu, a.hva + PAGE, PAGE, ffi.NULL, ptrs, sizes, 4) == 1
    assert int(ffi.cast("uintptr_t", ptrs[0])) == a.hva and sizes[0] == a.size
    assert set(sptes(mmu)) == {(0, 4), (0, 5)}
    o = xl(mmu, 0)
    assert o.kind == lib.KVMFS_XL_NEED_HVA and o.hva == a.hva
    hl = ffi.new("struct kvmfs_hostmem_info[]", 4)
    assert lib.kvmfs_hostmem_list(mmu, hl, 4) == 2 and hl[0].size == 0 and hl[1].size == b.size
    assert lib.kvmfs_hostmem_add(mmu, a.hva, a.size, a.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == 0      # re-resolved: new index
    assert lib.kvmfs_hostmem_list(mmu, hl, 4) == 3 and hl[2].uphys > hl[1].uphys
    o = xl(mmu, 0)
    assert o.kind == lib.KVMFS_XL_OK and o.uphys == hl[2].uphys
    assert stats(mmu).notifier_calls == 1


def test_hostmem_remove_in_batches(mmu):
    """At most max ranges go per call; the caller repeats while it gets max."""
    ms = [HostMem(mmu, PAGE) for _ in range(5)]
    lo = min(m.hva for m in ms)
    hi = max(m.hva for m in ms) + PAGE
    for i, m in enumerate(ms):
        assert mset(mmu, i, i * PAGE, PAGE, m.hva) == lib.KVMFS_MR_CREATE
        assert xl(mmu, i * PAGE).kind == lib.KVMFS_XL_OK
    sp = ffi.new("struct kvmfs_spte_info[]", 5)
    assert lib.kvmfs_mmu_list_sptes(mmu, sp, 5) == 5
    assert {(sp[i].gfn, sp[i].hva) for i in range(5)} == {(i, m.hva) for i, m in enumerate(ms)}
    ptrs, sizes = ffi.new("void *[]", 2), ffi.new("uint64_t[]", 2)
    got = []
    while True:
        n = lib.kvmfs_hostmem_remove(mmu, lo, hi - lo, ffi.NULL, ptrs, sizes, 2)
        got += [int(ffi.cast("uintptr_t", ptrs[i])) for i in range(n)]
        if n < 2:
            break
    assert sorted(got) == sorted(m.hva for m in ms)
    assert sptes(mmu) == {}


# ---------------------------------------------------- translate, no paging --

def test_translate_flat(mmu):
    a = HostMem(mmu, 8 * PAGE)
    assert mset(mmu, 0, 0x100000, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 0x200000, 4 * PAGE, a.hva + 4 * PAGE, RO) == lib.KVMFS_MR_CREATE
    o = xl(mmu, 0x101234)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x101000
    assert int(ffi.cast("uintptr_t", o.host)) == a.hva + PAGE
    assert o.perms == R_ | X_                 # read: no write until the first write
    o = xl(mmu, 0x101234, WRITE)
    assert o.perms == R_ | W_ | X_
    assert xl(mmu, 0x101000).perms == R_ | W_ | X_     # dirty now: reads may get W
    assert xl(mmu, 0x300000).kind == lib.KVMFS_XL_MMIO
    assert xl(mmu, 0x300000).gpa == 0x300000
    o = xl(mmu, 0x200000)
    assert o.kind == lib.KVMFS_XL_OK and o.perms == R_ | X_
    o = xl(mmu, 0x200000, WRITE)
    assert o.kind == lib.KVMFS_XL_MMIO and o.gpa == 0x200000
    assert xl(mmu, 0x1_0010_1000).gpa == 0x101000      # paging off: 32-bit linear
    sp = sptes(mmu)
    assert sp[(0, 0x101)] == lib.KVMFS_SPTE_W | lib.KVMFS_SPTE_X | lib.KVMFS_SPTE_A | lib.KVMFS_SPTE_D
    assert sp[(0, 0x200)] == lib.KVMFS_SPTE_X | lib.KVMFS_SPTE_A
    st = stats(mmu)
    assert st.sptes == 2 and st.spte_creates == 2 and st.mmio_faults == 3 and st.fills >= 8
    # address space 1 is separate
    o = xl(mmu, 0x101000, pg=paging(as_id=1))
    assert o.kind == lib.KVMFS_XL_MMIO


def test_translate_need_hva_then_ok(mmu):
    a = HostMem(mmu, 4 * PAGE, register=False)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    o = xl(mmu, 2 * PAGE + 5, WRITE)
    assert o.kind == lib.KVMFS_XL_NEED_HVA and o.hva == a.hva + 2 * PAGE
    assert lib.kvmfs_hostmem_add(mmu, a.hva, a.size, a.cbuf, 0, lib.kvmfs_mmu_invalidate_seq(mmu)) == 0
    o = xl(mmu, 2 * PAGE + 5, WRITE)
    assert o.kind == lib.KVMFS_XL_OK
    ffi.cast("char *", o.host)[5] = b"z"
    assert a.map[2 * PAGE + 5:2 * PAGE + 6] == b"z"


def test_delete_zaps_and_move(mmu):
    a = HostMem(mmu, 4 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    for i in range(4):
        assert xl(mmu, i * PAGE, WRITE).kind == lib.KVMFS_XL_OK
    assert len(sptes(mmu)) == 4
    assert mset(mmu, 0, 0x10000, 4 * PAGE, a.hva) == lib.KVMFS_MR_MOVE
    assert sptes(mmu) == {}
    assert xl(mmu, 0).kind == lib.KVMFS_XL_MMIO
    assert xl(mmu, 0x10000).kind == lib.KVMFS_XL_OK
    assert mset(mmu, 1, 0, PAGE, a.hva + 3 * PAGE) == lib.KVMFS_MR_CREATE   # new slot at old place
    assert int(ffi.cast("uintptr_t", xl(mmu, 0).host)) == a.hva + 3 * PAGE
    assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
    assert set(sptes(mmu)) == {(0, 0)}
    assert xl(mmu, 0x10000).kind == lib.KVMFS_XL_MMIO
    assert stats(mmu).zaps == 5


# ------------------------------------------------------------ paging modes --

class Guest:
    """4 MiB of guest RAM at gpa 0 in slot 0, with helpers to build tables."""

    def __init__(self, mmu, size=4 << 20):
        self.mmu = mmu
        self.mem = HostMem(mmu, size)
        assert mset(mmu, 0, 0, size, self.mem.hva) == lib.KVMFS_MR_CREATE

    def q(self, gpa, val=None):
        if val is None:
            return self.mem.u64(gpa)
        self.mem.set64(gpa, val)

    def d(self, gpa, val=None):
        if val is None:
            return self.mem.u32(gpa)
        self.mem.set32(gpa, val)


LM = dict(cr0=CR0_PE | CR0_PG | CR0_WP, cr3=0x1000, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NXE)


def lm_tables(g, va, leaf_flags=P | RW, upper=P | RW):
    """4-level tables at 0x1000 (PML4) 0x2000 (PDPT) 0x3000 (PD) 0x4000 (PT) for va -> 0x5000."""
    g.q(0x1000 + ((va >> 39) & 511) * 8, 0x2000 | upper)
    g.q(0x2000 + ((va >> 30) & 511) * 8, 0x3000 | upper)
    g.q(0x3000 + ((va >> 21) & 511) * 8, 0x4000 | upper)
    g.q(0x4000 + ((va >> 12) & 511) * 8, 0x5000 | leaf_flags)


def test_walk_4level(mmu):
    g = Guest(mmu)
    va = 0x00007f1234567000
    lm_tables(g, va)
    pg = paging(**LM)
    o = xl(mmu, va + 0x123, READ, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x5000
    assert o.perms == R_ | X_                  # clean leaf: no W on a read
    for t in (0x1000, 0x2000, 0x3000):
        assert g.q(t + ((va >> {0x1000: 39, 0x2000: 30, 0x3000: 21}[t]) & 511) * 8) & A
    leaf = 0x4000 + ((va >> 12) & 511) * 8
    assert g.q(leaf) & (A | D) == A
    o = xl(mmu, va, WRITE, pg)
    assert o.perms == R_ | W_ | X_ and g.q(leaf) & D
    assert xl(mmu, va, READ, pg).perms == R_ | W_ | X_    # D set in guest and spte
    # not present at each level -> PF with P clear
    o = xl(mmu, va + (1 << 39), WRITE, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_W
    assert xl(mmu, va + PAGE, READ, paging(**dict(LM, cpl=3))).pf_error_code == PF_U
    assert xl(mmu, va + PAGE, FETCH, pg).pf_error_code == PF_I
    assert stats(mmu).walk_faults == 3


def test_walk_user_supervisor_wp_nx(mmu):
    g = Guest(mmu)
    va = 0x400000
    lm_tables(g, va, leaf_flags=P)               # supervisor, read-only, upper levels RW
    user = paging(**dict(LM, cpl=3))
    o = xl(mmu, va, READ, user)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_U
    o = xl(mmu, va, WRITE, paging(**LM))         # CR0.WP: supervisor write to RO faults
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_W
    o = xl(mmu, va, WRITE, paging(**dict(LM, cr0=CR0_PE | CR0_PG)))   # WP off: allowed
    assert o.kind == lib.KVMFS_XL_OK and o.perms & W_
    assert xl(mmu, va, READ, paging(**dict(LM, cr0=CR0_PE | CR0_PG))).perms == R_ | W_ | X_
    assert xl(mmu, va, READ, paging(**LM)).perms == R_ | X_
    # user page, read-only at one upper level
    lm_tables(g, va, leaf_flags=P | RW | US, upper=P | US)
    o = xl(mmu, va, WRITE, user)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_W | PF_U
    o = xl(mmu, va, READ, user)
    assert o.kind == lib.KVMFS_XL_OK and o.perms == R_ | X_
    # NX on the leaf
    lm_tables(g, va, leaf_flags=P | RW | US | NX, upper=P | RW | US)
    o = xl(mmu, va, FETCH, user)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_U | PF_I
    assert xl(mmu, va, READ, user).perms == R_
    # NX bit without EFER.NXE is reserved
    o = xl(mmu, va, READ, paging(**dict(LM, efer=EFER_LME | EFER_LMA)))
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_RSVD
    # SMEP: supervisor fetch from a user page
    lm_tables(g, va, leaf_flags=P | RW | US, upper=P | RW | US)
    o = xl(mmu, va, FETCH, paging(**dict(LM, cr4=CR4_PAE | CR4_SMEP)))
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_I
    assert xl(mmu, va, READ, paging(**dict(LM, cr4=CR4_PAE | CR4_SMEP))).perms & X_ == 0


def test_walk_large_pages_64(mmu):
    g = Guest(mmu)
    pg = paging(**LM)
    # 2 MiB page: PD entry -> gpa 0x200000
    va = 0xffff800000200000
    g.q(0x1000 + ((va >> 39) & 511) * 8, 0x2000 | P | RW)
    g.q(0x2000 + ((va >> 30) & 511) * 8, 0x3000 | P | RW)
    g.q(0x3000 + ((va >> 21) & 511) * 8, 0x200000 | P | RW | PS | D)
    o = xl(mmu, va + 0x1a_3456, READ, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x3a3000
    assert o.perms == R_ | X_                  # guest D set, but the fresh spte is not dirty yet
    # 1 GiB page at gpa 0
    va2 = 0x0000004000000000
    g.q(0x1000 + ((va2 >> 39) & 511) * 8, 0x6000 | P | RW)
    g.q(0x6000 + ((va2 >> 30) & 511) * 8, 0x0 | P | RW | PS)
    o = xl(mmu, va2 + 0x12_3456, WRITE, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x123000
    assert g.q(0x6000 + ((va2 >> 30) & 511) * 8) & (A | D) == A | D
    # PS in a PML4E is reserved
    g.q(0x1000 + ((0x0000008000000000 >> 39) & 511) * 8, 0x0 | P | RW | PS)
    o = xl(mmu, 0x0000008000000000, READ, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code & PF_RSVD


def test_walk_read_sets_no_write_perm_until_dirty(mmu):
    g = Guest(mmu)
    pg = paging(**LM)
    va = 0x12345000
    lm_tables(g, va)
    assert xl(mmu, va, WRITE, pg).perms == R_ | W_ | X_        # sets D in guest and spte
    # the guest clears D in its PTE (as an OS does after writeback)
    leaf = 0x4000 + ((va >> 12) & 511) * 8
    g.q(leaf, g.q(leaf) & ~D)
    assert xl(mmu, va, READ, pg).perms == R_ | X_              # write must come back to set D
    xl(mmu, va, WRITE, pg)
    assert g.q(leaf) & D


def test_walk_32bit_and_pse(mmu):
    g = Guest(mmu)
    pg = paging(cr0=CR0_PE | CR0_PG | CR0_WP, cr3=0x1000)
    va = 0xc0123456
    g.d(0x1000 + (va >> 22) * 4, 0x2000 | P | RW | US)
    g.d(0x2000 + ((va >> 12) & 1023) * 4, 0x7000 | P | RW | US)
    o = xl(mmu, va, WRITE, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x7000 and o.perms == R_ | W_ | X_
    assert g.d(0x1000 + (va >> 22) * 4) & (A | D) == A
    assert g.d(0x2000 + ((va >> 12) & 1023) * 4) & (A | D) == A | D
    # no NX in 32-bit paging: fetch allowed; bit 31 of an entry is an address bit
    assert xl(mmu, va, FETCH, pg).kind == lib.KVMFS_XL_OK
    # not present: PF without I/D (no NXE, no SMEP)
    o = xl(mmu, 0x00400000, FETCH, paging(cr0=CR0_PE | CR0_PG, cr3=0x1000, cpl=3))
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_U
    # 4 MiB page with PSE
    va = 0x80312345
    g.d(0x1000 + (va >> 22) * 4, 0x00000000 | P | RW | PS)
    o = xl(mmu, va, READ, paging(cr0=CR0_PE | CR0_PG, cr3=0x1000, cr4=CR4_PSE))
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x312000
    # without CR4.PSE the PS bit is ignored: the PDE points at a table at gpa 0
    g.d(0x0000 + ((va >> 12) & 1023) * 4, 0x9000 | P)
    o = xl(mmu, va, READ, paging(cr0=CR0_PE | CR0_PG, cr3=0x1000))
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x9000


def test_walk_pae(mmu):
    g = Guest(mmu)
    pg = paging(cr0=CR0_PE | CR0_PG | CR0_WP, cr3=0x1020, cr4=CR4_PAE, efer=EFER_NXE)
    va = 0xc0201000
    g.q(0x1020 + 3 * 8, 0x2000 | P)                         # PDPTE 3
    g.q(0x2000 + ((va >> 21) & 511) * 8, 0x3000 | P | RW)
    g.q(0x3000 + ((va >> 12) & 511) * 8, 0x8000 | P | RW | NX)
    o = xl(mmu, va + 0x10, READ, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x8000 and o.perms == R_
    assert g.q(0x1020 + 3 * 8) & A == 0                      # PDPTEs get no A bit
    o = xl(mmu, va, FETCH, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_I
    # 2 MiB page in PAE
    va = 0x40200000
    g.q(0x1020 + 1 * 8, 0x4000 | P)
    g.q(0x4000 + ((va >> 21) & 511) * 8, 0x200000 | P | RW | PS)
    o = xl(mmu, va + 0x5432, WRITE, pg)
    assert o.kind == lib.KVMFS_XL_OK and o.gpa == 0x205000
    # PDPTE not present
    o = xl(mmu, 0x00001000, READ, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == 0


def test_walk_table_in_hole_or_unresolved(mmu):
    Guest(mmu)                                               # guest memory, slot 0
    pg = paging(**dict(LM, cr3=0x10000000))                  # PML4 in a hole
    o = xl(mmu, 0x1000, READ, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == 0
    other = HostMem(mmu, PAGE, register=False)
    assert mset(mmu, 1, 0x10000000, PAGE, other.hva) == lib.KVMFS_MR_CREATE
    o = xl(mmu, 0x1000, READ, pg)
    assert o.kind == lib.KVMFS_XL_NEED_HVA and o.hva == other.hva and o.gpa == 0x10000000


# ------------------------------------------------------------ dirty logging --

def test_dirty_logging(mmu):
    a = HostMem(mmu, 16 * PAGE)
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    assert dirty(mmu, 0, 16) == -errno.ENOENT
    xl(mmu, 0, WRITE)                                            # before logging: not reported
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
    assert sptes(mmu)[(0, 0)] & lib.KVMFS_SPTE_W == 0            # write-protected
    assert dirty(mmu, 0, 16) == 0
    for p in (0, 3, 15):
        assert xl(mmu, p * PAGE, READ).perms == R_ | X_           # a read does not mark
    assert dirty(mmu, 0, 16, get=False) == 0
    for p in (0, 3, 15):
        assert xl(mmu, p * PAGE + 8, WRITE).perms == R_ | W_ | X_
    assert stats(mmu).wp_faults == 3
    assert info(mmu, 0).dirty_count == 3
    assert dirty(mmu, 0, 16, get=False) == 0x8009
    assert dirty(mmu, 0, 16) == 0x8009
    assert dirty(mmu, 0, 16) == 0
    sp = sptes(mmu)
    assert all(not sp[(0, p)] & lib.KVMFS_SPTE_W for p in (0, 3, 15))
    assert xl(mmu, 3 * PAGE, READ).perms == R_ | X_              # re-protected
    xl(mmu, 3 * PAGE, WRITE)
    assert dirty(mmu, 0, 16) == 0x8
    # CLEAR by mask (without manual protect too)
    for p in (0, 3, 15):
        xl(mmu, p * PAGE, WRITE)
    assert clear(mmu, 0, 0, 16, 0x1) == 0
    assert dirty(mmu, 0, 16, get=False) == 0x8008
    assert xl(mmu, 0, READ).perms == R_ | X_
    assert xl(mmu, 3 * PAGE, READ).perms == R_ | W_ | X_         # still dirty: writable
    assert clear(mmu, 0, 64, 0, 0) == -errno.EINVAL              # first_page > npages
    assert clear(mmu, 0, 0, 17, 0) == -errno.EINVAL
    assert clear(mmu, 0, 1, 1, 0) == -errno.EINVAL
    assert clear(mmu, 0, 0, 0, 0) == 0
    # logging off frees the bitmap
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva, 0) == lib.KVMFS_MR_FLAGS_ONLY
    assert dirty(mmu, 0, 16) == -errno.ENOENT
    assert clear(mmu, 0, 0, 16, 1) == -errno.ENOENT
    assert xl(mmu, 0, WRITE).perms == R_ | W_ | X_               # no logging: W restored
    assert info(mmu, 0).dirty_count == 0
    # re-enable: fresh zero bitmap
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
    assert dirty(mmu, 0, 16) == 0
    # a READONLY logged slot: writes are MMIO, nothing logged
    assert mset(mmu, 1, 0x100000, PAGE, a.hva, LOG | RO) == lib.KVMFS_MR_CREATE
    assert xl(mmu, 0x100000, WRITE).kind == lib.KVMFS_XL_MMIO
    assert dirty(mmu, 1, 1) == 0


def test_dirty_bitmap_across_move_and_delete(mmu):
    a = HostMem(mmu, 200 * PAGE)
    assert mset(mmu, 0, 0, 200 * PAGE, a.hva, LOG) == lib.KVMFS_MR_CREATE
    for p in (1, 70, 199):
        xl(mmu, p * PAGE, WRITE)
    want = (1 << 1) | (1 << 70) | (1 << 199)
    assert mset(mmu, 0, 0x1000000, 200 * PAGE, a.hva, LOG) == lib.KVMFS_MR_MOVE
    assert dirty(mmu, 0, 200, get=False) == want                 # kept across MOVE
    assert xl(mmu, 0x1000000 + 70 * PAGE, READ).perms == R_ | X_  # fresh spte after move: protected
    assert mset(mmu, 0, 0x1000000, 200 * PAGE, a.hva, LOG) == lib.KVMFS_MR_NONE
    # clear pages 128..199 (72 pages from 128)
    assert clear(mmu, 0, 128, 72, (1 << 71) | 1) == 0
    assert dirty(mmu, 0, 200, get=False) == (1 << 1) | (1 << 70)
    assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
    assert mset(mmu, 0, 0x1000000, 200 * PAGE, a.hva, LOG) == lib.KVMFS_MR_CREATE
    assert dirty(mmu, 0, 200) == 0                               # re-created slot starts clean


def test_manual_protect_initially_set(mmu):
    a = HostMem(mmu, 16 * PAGE)
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    xl(mmu, 5 * PAGE, WRITE)
    lib.kvmfs_dirty_set_manual_protect(mmu, MANUAL | INITIALLY_SET)
    assert mset(mmu, 0, 0, 16 * PAGE, a.hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
    assert info(mmu, 0).dirty_count == 16
    assert dirty(mmu, 0, 16) == 0xFFFF
    assert dirty(mmu, 0, 16) == 0xFFFF                           # manual: GET only reports
    assert xl(mmu, 5 * PAGE, READ).perms & W_                    # all dirty: stays writable
    assert clear(mmu, 0, 0, 16, 0x0FFF) == 0
    assert dirty(mmu, 0, 16) == 0xF000
    assert xl(mmu, 5 * PAGE, READ).perms == R_ | X_
    xl(mmu, 5 * PAGE, WRITE)
    assert dirty(mmu, 0, 16) == 0xF020
    assert mset(mmu, 2, 0x200000, 100 * PAGE, a.hva, LOG) == lib.KVMFS_MR_CREATE
    assert dirty(mmu, 2, 100) == (1 << 100) - 1                  # only the slot's own pages
    lib.kvmfs_dirty_set_manual_protect(mmu, MANUAL)
    assert mset(mmu, 1, 0x100000, 100 * PAGE, a.hva, LOG) == lib.KVMFS_MR_CREATE
    assert dirty(mmu, 1, 100) == 0
    assert lib.kvmfs_dirty_get_log(mmu, 0, 1, ffi.new("char[]", 8), 8) == -errno.EINVAL  # short buffer
    assert lib.kvmfs_dirty_peek(mmu, 0, 7, ffi.new("char[]", 8), 8) == -errno.ENOENT


def test_page_table_ad_update_marks_dirty(mmu):
    g = Guest(mmu)
    assert mset(mmu, 0, 0, 4 << 20, g.mem.hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
    va = 0x7000_0000
    lm_tables(g, va)
    assert xl(mmu, va, READ, paging(**LM)).kind == lib.KVMFS_XL_OK
    bits = dirty(mmu, 0, 1024)
    assert bits == (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4)     # the four tables, not the data page
    assert xl(mmu, va, READ, paging(**LM)).kind == lib.KVMFS_XL_OK
    assert dirty(mmu, 0, 1024) == 0                              # A already set: no write


def test_dirty_log_1g_speed(mmu):
    """1 GiB of sptes, all dirty, harvested word-at-a-time (not a timing assertion)."""
    npages = 1 << 18
    m = HostMem(mmu, npages * PAGE)
    assert mset(mmu, 0, 0, npages * PAGE, m.hva, LOG) == lib.KVMFS_MR_CREATE
    for p in range(0, npages, 64):               # some sptes, not all: keep the test fast
        xl(mmu, p * PAGE, WRITE)
    nbytes = npages // 8
    buf = ffi.new("char[]", nbytes)
    t0 = time.perf_counter()
    assert lib.kvmfs_dirty_get_log(mmu, 0, 0, buf, nbytes) == 0
    t1 = time.perf_counter()
    assert lib.kvmfs_dirty_get_log(mmu, 0, 0, buf, nbytes) == 0
    t2 = time.perf_counter()
    assert not any(ffi.buffer(buf, nbytes)[:])
    print(f"GET_DIRTY_LOG 1 GiB: {npages // 64} dirty {1e6 * (t1 - t0):.0f} us, clean {1e6 * (t2 - t1):.1f} us")
    assert info(mmu, 0).dirty_count == 0
    assert not any(f & lib.KVMFS_SPTE_W for f in sptes(mmu).values())   # all re-protected
    assert xl(mmu, 64 * PAGE, READ).perms == R_ | X_


def test_reprotect_word_keeps_other_pages(mmu):
    """Re-protection is by bitmap word: only the reported pages lose W."""
    m = HostMem(mmu, 130 * PAGE)
    assert mset(mmu, 0, 0, 130 * PAGE, m.hva, LOG) == lib.KVMFS_MR_CREATE
    for p in (0, 1, 63, 64, 129):
        xl(mmu, p * PAGE, WRITE)
    xl(mmu, 2 * PAGE, READ)                                      # an spte without W
    lib.kvmfs_dirty_set_manual_protect(mmu, MANUAL)
    assert clear(mmu, 0, 0, 130, (1 << 1) | (1 << 64)) == 0
    sp = sptes(mmu)
    assert [p for p in (0, 1, 2, 63, 64, 129) if sp[(0, p)] & lib.KVMFS_SPTE_W] == [0, 63, 129]
    assert dirty(mmu, 0, 130, get=False) == 1 | (1 << 63) | (1 << 129)
    xl(mmu, 64 * PAGE, WRITE)                                    # WP fault: logged again, W back
    assert stats(mmu).wp_faults == 6
    assert sptes(mmu)[(0, 64)] & lib.KVMFS_SPTE_W
    assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
    assert mset(mmu, 0, 0, 130 * PAGE, m.hva) == lib.KVMFS_MR_CREATE   # not logging: W at once
    assert xl(mmu, 5 * PAGE, READ).kind == lib.KVMFS_XL_OK
    assert sptes(mmu)[(0, 5)] & lib.KVMFS_SPTE_W


def resident(addr, npages):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * npages)()
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(npages * PAGE), vec) == 0
    return [bool(v & 1) for v in vec]


def test_fault_around_populates_block_within_slot(mmu):
    """The first spte in a 64 KiB block of the daemon mapping populates that
    block, clipped to the slot; pages outside the slot stay untouched."""
    m = HostMem(mmu, 64 * PAGE)
    assert resident(m.hva, 64) == [False] * 64
    lo, hi = 8, 40                                               # the slot: host pages [8, 40)
    assert mset(mmu, 0, 0, (hi - lo) * PAGE, m.hva + lo * PAGE) == lib.KVMFS_MR_CREATE
    page = 20
    xl(mmu, (page - lo) * PAGE, WRITE)
    blk = (m.hva + page * PAGE) & ~0xFFFF
    want = [lo <= i < hi and blk <= m.hva + i * PAGE < blk + 0x10000 for i in range(64)]
    assert sum(want) > 1
    assert resident(m.hva, 64) == want
    # a second slot over the rest of the block populates only its own part
    assert mset(mmu, 1, 0x100000, lo * PAGE, m.hva) == lib.KVMFS_MR_CREATE
    xl(mmu, 0x100000 + 7 * PAGE, READ)
    got = resident(m.hva, 64)
    blk7 = (m.hva + 7 * PAGE) & ~0xFFFF      # page 7's own block: m.hva is only page aligned
    clip = [i for i in range(lo) if blk7 <= m.hva + i * PAGE < blk7 + 0x10000]
    if len(clip) > 1:                        # a one-page clip is left to the guest's own fault
        assert all(got[i] for i in clip)
    assert not any(got[i] for i in range(hi, 64) if not want[i])


# ------------------------------------------------------------------- flush --

class FakeVcpu:
    """A flush client whose 'guest' is a thread that acks after a delay."""

    def __init__(self, mmu, delay=0.05):
        self.mmu = mmu
        self.delay = delay
        self.kicked = threading.Event()
        self.acked_at = None
        self.stop = False
        self.client = ffi.new("struct kvmfs_flush_client *")
        self._cb = ffi.callback("void(void *)", self._kick)
        self.client.kick = self._cb
        self.client.opaque = ffi.NULL
        self.kicks = 0

    def _kick(self, opaque):
        self.kicks += 1
        self.kicked.set()         # like uc_emu_stop: only stops the emulator

    @contextlib.contextmanager
    def running(self, target=None):
        """Its thread (run, or target) inside the guest for the with-block; stopped after."""
        t = threading.Thread(target=target or self.run)
        t.start()
        try:
            while not self.client.in_guest:
                time.sleep(0.001)
            yield
        finally:
            self.stop = True
            t.join()

    def run(self):
        lib.kvmfs_mmu_enter(self.mmu, self.client)
        while not self.stop:
            if self.kicked.wait(0.01):
                self.kicked.clear()
                time.sleep(self.delay)
                gen = lib.kvmfs_mmu_flush_gen(self.mmu)   # read, then flush the TLB, then ack
                self.acked_at = time.perf_counter()
                lib.kvmfs_mmu_ack_flush(self.mmu, self.client, gen)
        lib.kvmfs_mmu_leave(self.mmu, self.client)


def test_flush_waits_for_ack(mmu):
    a = HostMem(mmu, 4 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    v = FakeVcpu(mmu)
    lib.kvmfs_mmu_attach(mmu, v.client)
    assert v.client.attached == 1
    with v.running():
        assert xl(mmu, 0, WRITE).kind == lib.KVMFS_XL_OK
        g0 = lib.kvmfs_mmu_flush_gen(mmu)
        t0 = time.perf_counter()
        assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
        t1 = time.perf_counter()
        # kicked (again while it was slow to answer), and not released before its ack
        assert v.kicks >= 1 and v.acked_at is not None and v.acked_at <= t1
        assert t1 - t0 >= v.delay * 0.9
        assert v.client.acked_gen == g0 + 1 == lib.kvmfs_mmu_flush_gen(mmu)
        # write-protect for dirty logging flushes; a harvest that re-protects nothing does not
        v.delay = 0
        assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
        xl(mmu, 0, WRITE)
        assert mset(mmu, 0, 0, 4 * PAGE, a.hva, LOG) == lib.KVMFS_MR_FLAGS_ONLY
        assert v.client.acked_gen == g0 + 2
        xl(mmu, 0, WRITE)
        assert dirty(mmu, 0, 4) == 1 and v.client.acked_gen == g0 + 3
        assert dirty(mmu, 0, 4) == 0 and lib.kvmfs_mmu_flush_gen(mmu) == g0 + 3
    # out of the guest: no kick, no wait
    kicks = v.kicks
    assert v.client.in_guest == 0
    xl(mmu, 0, WRITE)
    assert dirty(mmu, 0, 4) == 1 and v.kicks == kicks
    assert lib.kvmfs_mmu_flush_gen(mmu) > v.client.acked_gen      # it must flush at its next enter
    lib.kvmfs_mmu_detach(mmu, v.client)
    assert v.client.attached == 0
    st = stats(mmu)
    assert st.kicks == kicks and st.flushes == 4


def test_flush_rekicks_lost_kick(mmu):
    """A kick lost before the emulator started is sent again until the vCPU acks."""
    a = HostMem(mmu, 4 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    v = FakeVcpu(mmu, delay=0)
    lost = []
    real = v._kick

    def lossy(opaque):
        if not lost:
            lost.append(1)         # the first kick hits a vCPU that has not started yet
            return
        real(opaque)
    v._cb = ffi.callback("void(void *)", lossy)
    v.client.kick = v._cb
    lib.kvmfs_mmu_attach(mmu, v.client)
    with v.running():
        assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
        assert lost and v.kicks >= 1 and v.client.acked_gen == lib.kvmfs_mmu_flush_gen(mmu)
    lib.kvmfs_mmu_detach(mmu, v.client)


def test_flush_lets_vcpu_fill_while_waiting(mmu):
    """A kicked vCPU that is in translate (needs mmu_lock) must not deadlock the zapper."""
    a = HostMem(mmu, 4 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 0x10000, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    v = FakeVcpu(mmu, delay=0)
    filled = []

    def run():
        lib.kvmfs_mmu_enter(mmu, v.client)
        while not v.stop:
            if v.kicked.wait(0.01):
                v.kicked.clear()
                filled.append(xl(mmu, 0x10000, WRITE).kind)     # a fill between kick and ack
                lib.kvmfs_mmu_ack_flush(mmu, v.client, lib.kvmfs_mmu_flush_gen(mmu))
        lib.kvmfs_mmu_leave(mmu, v.client)

    lib.kvmfs_mmu_attach(mmu, v.client)
    with v.running(run):
        xl(mmu, 0, WRITE)
        assert mset(mmu, 0, 0, 0, 0) == lib.KVMFS_MR_DELETE
        assert filled == [lib.KVMFS_XL_OK]
    lib.kvmfs_mmu_detach(mmu, v.client)


def test_flush_stress(mmu):
    """vCPUs filling and acking while another thread zaps, harvests and ages: no
    deadlock, and afterwards every writable spte of the logging slot is dirty."""
    npages = 64
    a = HostMem(mmu, npages * PAGE)
    assert mset(mmu, 0, 0, npages * PAGE, a.hva, LOG) == lib.KVMFS_MR_CREATE
    vcpus = [FakeVcpu(mmu, delay=0) for _ in range(2)]
    errors = []

    def run(v, k):
        try:
            lib.kvmfs_mmu_enter(mmu, v.client)
            i = 0
            while not v.stop:
                i += 1
                kind = xl(mmu, ((i * 7 + k) % npages) * PAGE, WRITE if i % 3 else READ).kind
                if kind not in (lib.KVMFS_XL_OK, lib.KVMFS_XL_MMIO):
                    errors.append(kind)
                if v.kicked.is_set():
                    v.kicked.clear()
                    lib.kvmfs_mmu_ack_flush(mmu, v.client, lib.kvmfs_mmu_flush_gen(mmu))
            lib.kvmfs_mmu_leave(mmu, v.client)
        except Exception as e:     # reported by the main thread
            errors.append(e)

    threads = []
    for k, v in enumerate(vcpus):
        lib.kvmfs_mmu_attach(mmu, v.client)
        threads.append(threading.Thread(target=run, args=(v, k)))
        threads[-1].start()
    try:
        end = time.perf_counter() + 0.3
        i = 0
        while time.perf_counter() < end:
            i += 1
            dirty(mmu, 0, npages)
            assert clear(mmu, 0, 0, npages, (1 << npages) - 1) == 0
            lib.kvmfs_mmu_clear_young(mmu, 0, 0, npages)
            if i % 5 == 0:
                assert mset(mmu, 0, 0x100000, npages * PAGE, a.hva, LOG) == lib.KVMFS_MR_MOVE
                assert mset(mmu, 0, 0, npages * PAGE, a.hva, LOG) == lib.KVMFS_MR_MOVE
    finally:
        for v in vcpus:
            v.stop = True
        for th in threads:
            th.join(5)
    assert not any(th.is_alive() for th in threads) and not errors
    bits = dirty(mmu, 0, npages, get=False)
    for (as_id, gfn), flags in sptes(mmu).items():
        assert not flags & lib.KVMFS_SPTE_W or bits >> gfn & 1
    for v in vcpus:
        lib.kvmfs_mmu_detach(mmu, v.client)
    st = stats(mmu)
    print(f"stress: {st.fills} fills, {st.flushes} flushes, {st.kicks} kicks, {st.wp_faults} wp faults")
    assert st.flushes > 10


# ------------------------------------------------------------------- aging --

def test_young(mmu):
    a = HostMem(mmu, 8 * PAGE)
    assert mset(mmu, 0, 0, 4 * PAGE, a.hva) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 8 * PAGE, 4 * PAGE, a.hva + 4 * PAGE) == lib.KVMFS_MR_CREATE
    for p in (0, 2, 8, 11):
        xl(mmu, p * PAGE)
    assert lib.kvmfs_mmu_test_young(mmu, 0, 0, 16) == 4
    assert lib.kvmfs_mmu_test_young(mmu, 0, 1, 8) == 2      # pages 2 and 8
    assert lib.kvmfs_mmu_test_young(mmu, 1, 0, 16) == 0
    v = FakeVcpu(mmu, delay=0)
    lib.kvmfs_mmu_attach(mmu, v.client)
    with v.running():
        g = lib.kvmfs_mmu_flush_gen(mmu)
        assert lib.kvmfs_mmu_clear_young(mmu, 0, 2, 7) == 2     # pages 2 and 8
        assert v.kicks >= 1 and v.client.acked_gen == g + 1    # the cleared pages left the TLBs
    lib.kvmfs_mmu_detach(mmu, v.client)
    assert lib.kvmfs_mmu_test_young(mmu, 0, 0, 16) == 2
    sp = sptes(mmu)
    assert not sp[(0, 2)] & lib.KVMFS_SPTE_A and sp[(0, 0)] & lib.KVMFS_SPTE_A
    xl(mmu, 2 * PAGE)                                          # next access sets A again
    assert lib.kvmfs_mmu_test_young(mmu, 0, 0, 16) == 3
    assert lib.kvmfs_mmu_clear_young(mmu, 0, 0, 1 << 40) == 3
    assert lib.kvmfs_mmu_test_young(mmu, 0, 0, 16) == 0


def _stream(fn, *args, size):
    """A C view read to its end in pieces of at most size bytes."""
    cursor = ffi.new("uint64_t *", 0)
    buf = ffi.new("char[]", size)
    text = b""
    while True:
        n = fn(*args, cursor, buf, size)
        assert 0 <= n <= size
        if n == 0:
            return text.decode()
        assert buf[n - 1] == b"\n"                      # whole lines only
        text += ffi.unpack(buf, n)


def test_views_stream_in_whole_lines_from_a_cursor(mmu):
    """info/mmu and info/dirty come in pieces; any piece size gives the same text."""
    h = HostMem(mmu, 4 << 20)
    assert mset(mmu, 0, 0, 2 << 20, h.hva, flags=lib.KVM_MEM_LOG_DIRTY_PAGES) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 1, 0, 1 << 20, h.hva + (2 << 20), as_id=1) == lib.KVMFS_MR_CREATE
    assert mset(mmu, 2, 3 << 20, 1 << 20, h.hva + (3 << 20)) == lib.KVMFS_MR_CREATE   # never touched
    pages = list(range(0, 512, 3)) + [511]              # 172 sptes: more than one batch of C's
    for p in pages:
        xl(mmu, p << 12, WRITE)
    for p in range(0, 256, 5):
        xl(mmu, p << 12, READ, paging(as_id=1))
    want = sptes(mmu)
    texts = {size: _stream(lib.kvmfs_view_sptes, mmu, size=size) for size in (128, 200, 4096, 1 << 20)}
    assert len(set(texts.values())) == 1
    lines = texts[128].splitlines()
    assert lines[0] == "as gfn hva uphys perms"
    assert [(int(l.split()[0]), int(l.split()[1], 16)) for l in lines[1:]] == sorted(want)
    dirty_texts = {size: _stream(lib.kvmfs_view_dirty, mmu, 0, 0, size=size) for size in (64, 100, 1 << 16)}
    assert len(set(dirty_texts.values())) == 1
    assert dirty_texts[64].splitlines() == ["page gpa"] + [f"{p} 0x{p << 12:x}" for p in sorted(set(pages))]


def test_walk_address_bits_above_maxphyaddr_are_reserved(mmu):
    """A PTE frame above the guest's physical-address width is a #PF with P|RSVD (it was
    taken as MMIO); so is a 2 MiB page with a bit set between PAT and its frame."""
    g = Guest(mmu)
    va = 0x00007f1234567000
    lm_tables(g, va)
    leaf = 0x4000 + ((va >> 12) & 511) * 8
    pg = paging(**LM)
    pg.maxphyaddr = 40
    g.q(leaf, (1 << 40) | 0x5000 | P | RW)
    o = xl(mmu, va, READ, pg)
    assert o.kind == lib.KVMFS_XL_PF and o.pf_error_code == PF_P | PF_RSVD
    assert xl(mmu, va, WRITE, pg).pf_error_code == PF_P | PF_W | PF_RSVD
    g.q(leaf, (1 << 39) | 0x5000 | P | RW)                 # below the width: an ordinary gpa
    assert xl(mmu, va, READ, pg).kind == lib.KVMFS_XL_MMIO
    pd = 0x3000 + ((va >> 21) & 511) * 8
    g.q(pd, (1 << 13) | P | RW | PS)                          # bit 13: reserved in a 2 MiB PDE
    assert xl(mmu, va, READ, pg).pf_error_code == PF_P | PF_RSVD
