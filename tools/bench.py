"""`make bench`: kvmfs figures beside their anchors, measured in the same run.

Daemon and client are pinned to one CPU (cross-CPU wake-ups cost 75-330 us on
the 2-core reference machine and would drown every figure).  Each figure is the
best and the median of REPS repetitions.  Anchors: the same operation on the
host's /dev/kvm (when present) and the mount's own no-op ioctl round trip
(KVM_CHECK_EXTENSION on MNT/kvm), the FUSE floor.
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
                    os.path.join(REPO, "tools", name + ".c"), *extra], check=True)
    return out


def pinned(cmd, env=None):
    r = subprocess.run(["taskset", "-c", CPU, *cmd], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return [float(x) for x in r.stdout.split()]


def reps(fn, n):
    samples = [fn() for _ in range(n)]
    return samples


def fmt(ns):
    return f"{ns / 1000:.2f} us" if ns >= 1000 else f"{ns:.0f} ns"


def row(name, samples, anchor=None, anchor_name=""):
    best, med = min(samples), statistics.median(samples)
    text = f"  {name:<52} best {fmt(best):>10}  median {fmt(med):>10}"
    if anchor:
        text += f"   {best / anchor:5.2f}x {anchor_name}"
    print(text, flush=True)
    return best


class Mount:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kvmfs-bench.")
        self.log = self.dir + ".log"
        subprocess.run(["taskset", "-c", CPU, sys.executable, "-m", "kvmfs", "mount", self.dir,
                        "--log", self.log], check=True, cwd=REPO, stdout=subprocess.DEVNULL)

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    have_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    with tempfile.TemporaryDirectory() as tmp:
        tools = {name: build(tmp, name) for name in ("ioctl_loop", "bench_memslots")}
        mnt = Mount()
        try:
            t0 = time.time()
            print(f"kvmfs benchmarks (daemon and client on CPU {CPU}; {args.reps} repetitions; "
                  f"/dev/kvm {'present' if have_kvm else 'absent'})\n")
            bench_memslots(tools, mnt, args.reps, have_kvm)
            print(f"\n({time.time() - t0:.0f} s)")
        finally:
            mnt.close()


if __name__ == "__main__":
    main()
