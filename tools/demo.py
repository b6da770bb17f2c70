"""`make demo`: mount kvmfs in a temporary directory, drive it as a VMM would, show it, unmount.

Every step prints what it does and what the mount shows; nothing here uses
kvmfs internals, only the files and ioctls any client has.
"""
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kvmfs import abi  # noqa: E402
from kvmfs.client import Kvm, alloc_guest_memory  # noqa: E402

MiB = 1 << 20


def step(text):
    print(f"\n== {text}", flush=True)


def show(path, indent="   "):
    with open(path) as f:
        for line in f.read().splitlines():
            print(indent + line)


def shell(script, cwd):
    """Show script (lines after the first start with '$ ') and run it in one bash."""
    print("   $ " + script)
    cmd = "\n".join(line.strip().lstrip("$ ") for line in script.splitlines())
    out = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        print("     " + line)


def run_guest(mnt, kvm):
    """The bundled guest: real mode -> protected mode -> long mode, printing on port 0xE9."""
    from kvmfs import guests
    image, load = guests.load("demo"), guests.gpa("demo")
    vm = kvm.create_vm()
    mem = alloc_guest_memory(2 * MiB)
    mem.map[load:load + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, mem.address)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.selector, sregs.cs.base = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = load, 2
    vcpu.set_regs(regs)
    step(f"run the bundled guest on {vm.dir}/vcpu0 (its source: kvmfs/guests/demo.S)")
    text = b""
    exits = {}
    logged = False
    while True:
        vcpu.run()
        reason = vcpu.kvm_run.exit_reason
        exits[abi.EXIT_REASONS.get(reason, reason)] = exits.get(abi.EXIT_REASONS.get(reason, reason), 0) + 1
        if reason == abi.KVM_EXIT_IO and vcpu.kvm_run.exit.io.port == 0xE9:
            text += vcpu.io_data()
            if text.endswith(b"\n"):
                print("   guest says: " + text.decode(errors="replace").rstrip())
                text = b""
        elif reason == abi.KVM_EXIT_IO and vcpu.kvm_run.exit.io.port == 0xEA and not logged:
            # The guest asks for dirty logging before it touches its data pages.
            vm.set_user_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, mem.address)
            logged = True
            print("   VMM: dirty logging on for slot 0")
        elif reason == abi.KVM_EXIT_HLT:
            break
        elif reason != abi.KVM_EXIT_IO:
            print(f"   unexpected exit {abi.EXIT_REASONS.get(reason, reason)}")
            break
    print(f"   exits: {exits}")
    step(f"cat {vm.dir}/info/vcpu0")
    show(os.path.join(vm.dir, "info", "vcpu0"))
    if logged:
        step(f"cat {vm.dir}/info/dirty/0.0   (pages the guest wrote while logging was on)")
        show(os.path.join(vm.dir, "info", "dirty", "0.0"))
        bitmap = vm.get_dirty_log(0, 2 * MiB // 4096)
        pages = [w * 64 + b for w, word in enumerate(bitmap) for b in range(64) if word >> b & 1]
        print(f"   KVM_GET_DIRTY_LOG: {len(pages)} dirty pages: {pages[:12]}{' ...' if len(pages) > 12 else ''}")
    step(f"cat {vm.dir}/info/stats")
    show(os.path.join(vm.dir, "info", "stats"))
    vcpu.close()
    vm.close()


def run_unmodified(mnt):
    """`kvmfs run`: a VMM written against <linux/kvm.h> alone, unmodified, on this mount."""
    sys.path.insert(0, os.path.join(REPO, "tests", "programs"))
    import build as programs
    prog = programs.build("io_hlt", static=False, quiet=True)
    rel = os.path.relpath(prog, REPO)
    step(f"kvmfs run --mount {mnt} -- {rel}   (a VMM on <linux/kvm.h> only: "
         "tests/programs/io_hlt.c)")
    out = subprocess.run([sys.executable, "-m", "kvmfs", "run", "--mount", mnt, "--", prog],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    for line in (out.stdout + out.stderr).splitlines():
        print("   " + line)


def main():
    mnt = tempfile.mkdtemp(prefix="kvmfs-demo.")
    log = mnt + ".log"
    step(f"kvmfs mount {mnt}")
    subprocess.run([sys.executable, "-m", "kvmfs", "mount", mnt, "--log", log], check=True, cwd=REPO)
    try:
        kvm = Kvm(mnt)
        step(f"ls {mnt}")
        print("   " + "  ".join(sorted(os.listdir(mnt))))
        print(f"   KVM_GET_API_VERSION = {kvm.get_api_version()}, "
              f"KVM_CAP_NR_MEMSLOTS = {kvm.check_extension(abi.KVM_CAP_NR_MEMSLOTS)}, "
              f"KVM_CAP_MULTI_ADDRESS_SPACE = {kvm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE)}")

        step("a VMM creates a VM and two memslots over memfd memory (KVM_SET_USER_MEMORY_REGION)")
        vm = kvm.create_vm()
        mem = alloc_guest_memory(2 * MiB)
        vm.set_user_memory_region(0, 0, 0x0, MiB, mem.address)
        vm.set_user_memory_region(1, abi.KVM_MEM_READONLY, 0x100000, MiB, mem.address + MiB)
        vm.set_user_memory_region(1 << 16, 0, 0x0, MiB, mem.address)     # address space 1 (SMM)
        try:
            vm.set_user_memory_region(2, 0, 0x80000, MiB, mem.address)
        except OSError as e:
            print(f"   an overlapping slot is refused as KVM refuses it: {e.strerror}")
        step(f"cat {vm.dir}/info/memslots")
        show(os.path.join(vm.dir, "info", "memslots"))

        step("guest memory is the VMM's memory: a VMM store is visible in the mem file, and back")
        mem.map[0x1000:0x1000 + 15] = b"written by VMM\n"
        print(f"   pread({vm.dir}/mem, gpa 0x1000) -> {vm.read_gpa(0x1000, 15)!r}")
        vm.write_gpa(0x2000, b"written via mem file")
        print(f"   the VMM's memory at +0x2000   -> {bytes(mem.map[0x2000:0x2014])!r}")

        step("the same from a shell (one shell: a VM belongs to the process that created it)")
        shell("exec 3<>cmd; echo create_vm >&3; read -r _ n <&3; echo \"vm$n created\"\n"
              "     $ echo 'set_user_memory_region 0 0 0x0 0x10000' > vm$n/cmd\n"
              "     $ printf 'hello from dd' | dd of=vm$n/mem bs=1 seek=4096 conv=notrunc status=none\n"
              "     $ dd if=vm$n/mem bs=1 skip=4096 count=13 status=none; echo\n"
              "     $ cat vm$n/info/memslots", mnt)

        run_guest(mnt, kvm)
        vm.close()
        kvm.close()
        run_unmodified(mnt)
    finally:
        step(f"kvmfs umount {mnt}")
        subprocess.run([sys.executable, "-m", "kvmfs", "umount", mnt], cwd=REPO)
        os.rmdir(mnt)
    print(f"\n(daemon log: {log})")


if __name__ == "__main__":
    main()
