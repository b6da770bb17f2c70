"""`make bench`: kvmfs figures beside their anchors, measured in the same run.

Daemon and client are pinned to one CPU (cross-CPU wake-ups cost 75-330 us on
the 2-core reference machine and would drown every figure), except for the
4-vCPU figure, which runs on a second, unpinned mount.  Each figure is the best
and the median of REPS repetitions.  Anchors: the same operation on the host's
/dev/kvm (when present), unicorn alone (Python binding, no kvmfs, same guest
loop) and the mount's own no-op ioctl round trip (KVM_CHECK_EXTENSION on
MNT/kvm), the FUSE floor.  A figure that fails prints its error and the run
goes on.  `--quick`: fewer repetitions and smaller sizes, for a smoke run.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = "0"
KVM_CHECK_EXTENSION = 0xAE03


def build(tmp, name, extra=()):
    out = os.path.join(tmp, name)
    subprocess.run(["gcc", "-O2", "-I", os.path.join(REPO, "clients"), "-o", out,
                    os.path.join(REPO, "bench", name + ".c"), *extra], check=True)
    return out


def _stdout(cmd, env, cpu):
    """cmd's output, run on cpu (taskset) when cpu is set; its last stderr line if it fails."""
    r = subprocess.run((["taskset", "-c", cpu] if cpu else []) + list(cmd), capture_output=True,
                       text=True, env=env, timeout=300)
    if r.returncode:
        raise RuntimeError(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:])}: "
                           f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'exit %d' % r.returncode}")
    return r.stdout


def pinned(cmd, env=None, cpu=CPU):
    return [float(x) for x in _stdout(cmd, env, cpu).split()]


def lines(cmd, env=None, cpu=CPU):
    """One sample per output line (a tuple when a line has several fields)."""
    return [[float(x) for x in ln.split()] for ln in _stdout(cmd, env, cpu).splitlines() if ln.strip()]


def reps(fn, n):
    samples = [fn() for _ in range(n)]
    return samples


def fmt(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1000:
        return f"{ns / 1000:.2f} us"
    return f"{ns:.0f} ns" if ns >= 100 else f"{ns:.3g} ns"


def row(name, samples, anchor=None, anchor_name=""):
    best, med = min(samples), statistics.median(samples)
    text = f"  {name:<52} best {fmt(best):>10}  median {fmt(med):>10}"
    if anchor:
        text += f"   {best / anchor:5.2f}x {anchor_name}"
    print(text, flush=True)
    return best


class Mount:
    def __init__(self, cpu=CPU):
        self.dir = tempfile.mkdtemp(prefix="kvmfs-bench.")
        self.log = self.dir + ".log"
        subprocess.run((["taskset", "-c", cpu] if cpu else []) +
                       [sys.executable, "-m", "kvmfs", "mount", self.dir, "--log", self.log],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)

    def close(self):
        subprocess.run([sys.executable, "-m", "kvmfs", "umount", self.dir], cwd=REPO)
        os.rmdir(self.dir)


def bench_memslots(tools, mnt, n_reps, have_kvm):
    print("KVM_SET_USER_MEMORY_REGION add / delete of one 4 KiB slot with K slots present")
    floor = row("no-op ioctl on MNT/kvm (the FUSE floor)",
                reps(lambda: pinned([tools["ioctl_loop"], os.path.join(mnt.dir, "kvm"),
                                     str(KVM_CHECK_EXTENSION), "10", "20000"])[0], n_reps))
    if have_kvm:
        row("no-op ioctl on /dev/kvm (syscall floor)",
            reps(lambda: pinned([tools["ioctl_loop"], "/dev/kvm", str(KVM_CHECK_EXTENSION),
                                 "10", "200000"])[0], n_reps))
    for k in (100, 1000, 10000):
        n = "2000"
        env_kvmfs = dict(os.environ, KVMFS_MNT=mnt.dir)
        env_kvm = {e: v for e, v in os.environ.items() if e != "KVMFS_MNT"}
        ours = reps(lambda: pinned([tools["bench_memslots"], str(k), n], env_kvmfs), n_reps)
        row(f"kvmfs  K={k:<5} add", [a for a, _ in ours], floor, "FUSE floor")
        row(f"kvmfs  K={k:<5} delete", [d for _, d in ours], floor, "FUSE floor")
        if have_kvm:
            real = reps(lambda: pinned([tools["bench_memslots"], str(k), "500"], env_kvm), n_reps)
            row(f"/dev/kvm K={k:<5} add", [a for a, _ in real])
            row(f"/dev/kvm K={k:<5} delete", [d for _, d in real])
    return floor



def rate(ns_per_op, unit):
    r = 1e9 / ns_per_op
    for div, sfx in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= div:
            return f"{r / div:.3g} {sfx}{unit}/s"
    return f"{r:.3g} {unit}/s"


def fig(name, samples, unit=None, vs=(), target=None):
    """Print one figure: best/median time per op (and rate when unit is given), then the
    ratio of its best to each anchor's best (time ratio: < 1 is faster than the anchor).
    target = (anchor index, max time ratio) marks the figure's target met or missed."""
    best, med = min(samples), statistics.median(samples)
    text = f"  {name:<50} best {fmt(best):>9}  median {fmt(med):>9}"
    if unit:
        text += f"  ({rate(best, unit)})"
    for i, (label, a) in enumerate(vs):
        if a:
            text += f"\n  {'':<50}   {best / a:7.2f}x the time of {label}"
            if unit:
                text += f" = {100 * a / best:.0f}% of its speed"
            if target and target[0] == i:
                text += "   [target <= %.2fx: %s]" % (target[1], "met" if best / a <= target[1] else "MISSED")
    print(text, flush=True)
    return best


def guarded(label, fn):
    """Run one figure; on failure print the error line and go on (None)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark run must not abort
        print(f"  {label:<50} ERROR: {e}", flush=True)
        return None


def env_for(mnt):
    env = {e: v for e, v in os.environ.items() if e not in ("KVMFS_MNT", "BG_PAGES", "BG_FRESH")}
    if mnt:
        env["KVMFS_MNT"] = mnt
    return env


def col(samples, i):
    return [x[i] for x in samples]


def bench_exits(t, mnt, q, have_kvm):
    n_fuse, n_kvm, r = q["exit_n"], q["exit_n"], q["reps"]
    print("1. Exits: OUT-exit round trip (guest `out dx,al; jmp $-1`, VMM loop KVM_RUN -> exit -> KVM_RUN)")
    floor = guarded("no-op ioctl on MNT/kvm (the FUSE floor)", lambda: fig(
        "no-op ioctl on MNT/kvm (FUSE floor)",
        [x[0] for x in lines([t["ioctl_loop"], os.path.join(mnt.dir, "kvm"), str(KVM_CHECK_EXTENSION),
                              "10", str(n_fuse)]) for _ in range(r)]))
    real = None
    if have_kvm:
        real = guarded("/dev/kvm C, real mode", lambda: fig(
            "/dev/kvm, C VMM, real-mode out", col(lines([t["bench_guest"], "exit", "real", str(n_kvm), str(r)],
                                                     env_for(None)), 0), "exit"))
    vs = [("the FUSE floor", floor), ("/dev/kvm real-mode out", real)]
    for mode in ("real", "long"):
        guarded(f"kvmfs C {mode}", lambda: fig(
            f"kvmfs, C VMM (bench_guest.c), {mode}-mode out",
            col(lines([t["bench_guest"], "exit", mode, str(n_fuse), str(r)], env_for(mnt.dir)), 0),
            "exit", vs, target=(0, 1.25)))
    py = [sys.executable, os.path.join(REPO, "bench", "bench_pyclient.py")]
    guarded("kvmfs Python", lambda: fig(
        "kvmfs, Python VMM (kvmfs.client), real-mode out",
        col(lines(py + [mnt.dir, str(n_fuse // 2), str(r)]), 0), "exit", vs))
    if have_kvm:
        guarded("/dev/kvm Python", lambda: fig(
            "/dev/kvm, Python VMM (kvmfs.client), real-mode out",
            col(lines(py + ["-", str(n_kvm // 2), str(r)]), 0), "exit"))
    return floor


def bench_compute(t, mnt, q, have_kvm):
    r, it = q["reps"], q["iters"]
    print("\n2. Guest compute: {add, xor, dec, jnz} x N per KVM_RUN, then out (time per guest instruction)")
    uc = [sys.executable, os.path.join(REPO, "bench", "bench_unicorn.py")]
    anchors = {}
    for mode, ucm in (("long", "64"), ("real", "16")):
        anchors[mode] = guarded(f"unicorn {ucm}", lambda: fig(
            f"unicorn alone, {ucm}-bit, Python binding, no hooks",
            col(lines(uc + ["compute", ucm, str(it * 4), str(r)]), 0), "instr"))
    guarded("unicorn code hook", lambda: fig(
        "  split: unicorn + empty C UC_HOOK_CODE, 64-bit",
        col(lines(uc + ["codehook", "64", str(it // 2), str(r), t["uc_codehook.so"]]), 0), "instr",
        [("unicorn alone", anchors["long"])]))
    kvm = {}
    if have_kvm:
        kvm["real"] = guarded("/dev/kvm real", lambda: fig(
            "/dev/kvm real mode (EMULATED by PVM here)",
            col(lines([t["bench_guest"], "compute", "real", str(q["kvm_iters"]), str(min(r, 3))],
                      env_for(None)), 0), "instr"))
        kvm["long"] = guarded("/dev/kvm user", lambda: fig(
            "/dev/kvm 64-bit CPL3 (native under PVM)",
            col(lines([t["bench_guest"], "compute", "user", str(it * 10), str(r)], env_for(None)), 0),
            "instr"))
    for mode, label in (("long", "64-bit"), ("real", "real mode")):
        guarded(f"kvmfs compute {mode}", lambda: fig(
            f"kvmfs {label}",
            col(lines([t["bench_guest"], "compute", mode, str(it), str(r)], env_for(mnt.dir)), 0), "instr",
            [("unicorn alone", anchors[mode]),
             (f"/dev/kvm {'real mode (emulated)' if mode == 'real' else 'CPL3 (native)'}", kvm.get(mode))],
            target=(0, 1 / 0.7)))
    print("   ALU + memory: {add [rdi+rsi],eax; add esi,64; and esi,0xfffff; dec ecx; jnz} over 1 MiB")
    ucm = guarded("unicorn memloop", lambda: fig(
        "unicorn alone, 64-bit, default TLB, flat",
        col(lines(uc + ["memloop", str(it // 2), str(r)]), 0), "instr"))
    guarded("kvmfs memloop", lambda: fig(
        "kvmfs 64-bit, dirty logging ON for the slot",
        col(lines([t["bench_guest"], "memloop", "long", str(it // 2), str(r)], env_for(mnt.dir)), 0),
        "instr", [("unicorn alone", ucm)], target=(0, 1 / 0.7)))
    return anchors.get("long")


def bench_fill(t, mnt, q, have_kvm):
    r, mib = q["reps"], q["touch_mib"]
    print(f"\n3. MMU fill path: one write per 4 KiB page over {mib} MiB (64-bit guest, CPL0, identity "
          "page tables of 4 KiB pages; host pages already written by the VMM; fresh logged slot)")
    uc = [sys.executable, os.path.join(REPO, "bench", "bench_unicorn.py")]
    ucf = guarded("unicorn fill", lambda: fig(
        "unicorn alone: own TLB fill, no hook, flat, TLB flushed",
        col(lines(uc + ["touch", str(mib), str(r)]), 0), "page"))
    hm = guarded("host minor fault", lambda: fig(
        "  split: host only, first write via a 2nd memfd mapping",
        col(lines([t["bench_guest"], "hostmap", str(mib), str(r)]), 0), "page"))
    wp = None
    if have_kvm:
        kmib = q["kvm_touch_mib"]
        kv = guarded("/dev/kvm touch", lambda: lines([t["bench_guest"], "touch", "user", str(kmib), "2"],
                                                     env_for(None)))
        if kv:
            fig(f"/dev/kvm CPL3, first touch ({kmib} MiB)", col(kv, 0), "page")
            wp = fig("/dev/kvm CPL3, write to a clean page, logging on", col(kv, 1), "page")
    ours = guarded("kvmfs touch", lambda: lines([t["bench_guest"], "touch", "long", str(mib), str(min(r, 3))],
                                                env_for(mnt.dir)))
    if ours:
        fig("kvmfs first touch (fill: walk + spte + unicorn TLB)", col(ours, 0), "page",
            [("unicorn's own fill", ucf), ("the host minor fault alone", hm)], target=(0, 1.5))
        fig("kvmfs write to a clean page, logging on (WP fault)", col(ours, 1), "page",
            [("/dev/kvm's dirty-logging write fault", wp)])
        # The daemon populates 64 KiB of its mapping at a time (fault-around), so a
        # page no longer pays a whole host fault: the split only holds when it does.
        if ucf and hm and min(col(ours, 0)) > hm:
            rest = min(col(ours, 0)) - hm
            print(f"  {'':<50}   split: first touch minus the host minor fault = {fmt(rest)} = "
                  f"{rest / ucf:.2f}x unicorn's own fill", flush=True)
        b = min(col(ours, 1))
        print(f"  {'':<50}   target <= 1 us: {'met' if b <= 1000 else 'MISSED'}", flush=True)


def bench_dirty_log(t, mnt, q, have_kvm):
    r, mib = q["reps"], q["log_mib"]
    print(f"\n4. KVM_GET_DIRTY_LOG on a {mib} MiB slot: guest wrote every page (GET clears and "
          "re-protects), then nothing dirty (guest: 64-bit CPL0 on both)")
    kvm = None
    if have_kvm:
        kvm = guarded("/dev/kvm dirtylog", lambda: lines(
            [t["bench_guest"], "dirtylog", "long", str(mib), str(min(r, 3))], env_for(None)))
        if kvm:
            fig("/dev/kvm, all dirty", col(kvm, 0))
            fig("/dev/kvm, nothing dirty (first call after)", col(kvm, 1))
            fig("/dev/kvm, nothing dirty (best of 5 more)", col(kvm, 2))
    ours = guarded("kvmfs dirtylog", lambda: lines([t["bench_guest"], "dirtylog", "long", str(mib), str(min(r, 3))],
                                                   env_for(mnt.dir)))
    if ours:
        a = min(col(kvm, 0)) if kvm else None
        fig("kvmfs, all dirty", col(ours, 0), vs=[("/dev/kvm", a)], target=(0, 1.0))
        fig("kvmfs, nothing dirty (first call after)", col(ours, 1),
            vs=[("/dev/kvm", min(col(kvm, 1)) if kvm else None)], target=(0, 1.0))
        fig("kvmfs, nothing dirty (best of 5 more)", col(ours, 2),
            vs=[("/dev/kvm", min(col(kvm, 2)) if kvm else None)], target=(0, 1.0))


def bench_smp(t, q, uc_anchor):
    r, it = q["reps"], q["iters"]
    print("\n5. 4 vCPUs, 4 client threads, each one KVM_RUN of the compute loop (64-bit); a second mount "
          "whose daemon and client are NOT pinned (both cores); aggregate time per guest instruction")
    try:
        m2 = Mount(cpu=None)
    except Exception as e:  # noqa: BLE001
        print(f"  unpinned mount: ERROR: {e}")
        return
    try:
        one = guarded("kvmfs 1 vCPU unpinned", lambda: fig(
            "kvmfs, 1 vCPU (unpinned mount)",
            col(lines([t["bench_guest"], "smp", "1", "long", str(it), str(r)], env_for(m2.dir), cpu=None), 0),
            "instr"))
        guarded("kvmfs 4 vCPUs", lambda: fig(
            "kvmfs, 4 vCPUs aggregate (unpinned mount)",
            col(lines([t["bench_guest"], "smp", "4", "long", str(it), str(r)], env_for(m2.dir), cpu=None), 0),
            "instr", [("unicorn alone single-threaded", uc_anchor), ("kvmfs 1 vCPU", one)]))
    finally:
        m2.close()


def bench_run(t, mnt, q, have_kvm):
    """7. kvmfs run: bench_raw.c, a VMM on <linux/kvm.h> alone, unmodified on kvmfs."""
    n, r = q["exit_n"], q["reps"]
    print("\n7. kvmfs run: one VMM binary on <linux/kvm.h> only (bench_raw.c), unmodified")
    run = [sys.executable, "-m", "kvmfs", "run", "--mount", mnt.dir, "--mechanism"]
    real = None
    if have_kvm:
        real = guarded("/dev/kvm raw exit", lambda: fig(
            "/dev/kvm, bench_raw, real-mode out", col(lines([t["bench_raw"], "exit", str(n), str(r)]), 0),
            "exit"))
    kvmfs_h = guarded("kvmfs.h exit", lambda: fig(
        "kvmfs, bench_guest.c on kvmfs.h, real-mode out",
        col(lines([t["bench_guest"], "exit", "real", str(n), str(r)], env_for(mnt.dir)), 0), "exit"))
    vs = [("the same exit on kvmfs.h", kvmfs_h), ("/dev/kvm", real)]
    guarded("preload exit", lambda: fig(
        "kvmfs run --mechanism preload, bench_raw", col(lines(
            run + ["preload", "--", t["bench_raw"], "exit", str(n), str(r)]), 0), "exit", vs,
        target=(0, 1.05)))
    guarded("seccomp exit", lambda: fig(
        "kvmfs run --mechanism seccomp, bench_raw (static)", col(lines(
            run + ["seccomp", "--", t["bench_raw_static"], "exit", str(n), str(r)]), 0), "exit", vs))
    mib = q["convert_mib"]
    anchor = None
    if have_kvm:
        anchor = guarded("/dev/kvm memslot", lambda: fig(
            f"/dev/kvm, register {mib} MiB of private memory", col(lines(
                [t["bench_raw"], "convert", str(mib), str(r)]), 0)))
    best = guarded("conversion", lambda: fig(
        f"preload, register {mib} MiB of private memory (converted)", col(lines(
            run + ["preload", "--", t["bench_raw"], "convert", str(mib), str(r)]), 0), None,
        [("/dev/kvm", anchor)]))
    if best:
        print(f"  {'':<50}   = {best * (1024 / mib) / 1e6:.0f} ms per GiB converted")
    for size, label in ((0, "1 page"), (mib, f"{mib} MiB")):
        arg = str(size)
        kvm_t = None
        if have_kvm:
            kvm_t = guarded("/dev/kvm munmap", lambda: fig(
                f"/dev/kvm, munmap of a {label} slot", col(lines(
                    [t["bench_raw"], "munmap", arg, str(r)]), 0)))
        guarded("preload munmap", lambda: fig(
            f"preload, munmap of a {label} slot (invalidation)", col(lines(
                run + ["preload", "--", t["bench_raw"], "munmap", arg, str(r)]), 0), None,
            [("/dev/kvm", kvm_t)]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, smaller sizes")
    args = p.parse_args()
    q = dict(reps=5, exit_n=20000, iters=5_000_000, kvm_iters=200_000, touch_mib=256, kvm_touch_mib=64,
             log_mib=1024, memslot_reps=5, convert_mib=1024)
    if args.quick:
        q.update(reps=2, exit_n=3000, iters=1_000_000, kvm_iters=50_000, touch_mib=64, kvm_touch_mib=16,
                 log_mib=256, memslot_reps=2, convert_mib=128)
    if args.reps:
        q["reps"] = q["memslot_reps"] = args.reps
    have_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    with tempfile.TemporaryDirectory() as tmp:
        tools = {name: build(tmp, name) for name in ("ioctl_loop", "bench_memslots")}
        tools["bench_guest"] = build(tmp, "bench_guest", ["-lpthread"])
        tools["bench_raw"] = build(tmp, "bench_raw")
        tools["bench_raw_static"] = build(tmp, "bench_raw", ["-static"])
        os.replace(tools["bench_raw_static"], tools["bench_raw_static"] + "-static")
        tools["bench_raw_static"] += "-static"
        tools["bench_raw"] = build(tmp, "bench_raw")
        so = os.path.join(tmp, "uc_codehook.so")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", so,
                        os.path.join(REPO, "bench", "uc_codehook.c")], check=True)
        tools["uc_codehook.so"] = so
        t0 = time.time()
        print(f"kvmfs benchmarks (daemon and client on CPU {CPU} unless said; {q['reps']} repetitions"
              f"{', quick' if args.quick else ''}; /dev/kvm {'present' if have_kvm else 'absent'}; "
              f"ratios compare best with best)\n")
        mnt = Mount()
        try:
            bench_exits(tools, mnt, q, have_kvm)
            uc64 = bench_compute(tools, mnt, q, have_kvm)
            bench_fill(tools, mnt, q, have_kvm)
            bench_dirty_log(tools, mnt, q, have_kvm)
            bench_run(tools, mnt, q, have_kvm)
        finally:
            mnt.close()
        bench_smp(tools, q, uc64)
        print("\n6. ", end="")
        mnt = Mount()
        try:
            bench_memslots(tools, mnt, q["memslot_reps"], have_kvm)
        finally:
            mnt.close()
        print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
