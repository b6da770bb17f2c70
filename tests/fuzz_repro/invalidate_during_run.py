"""`invalidate HVA SIZE` (the MMU-notifier command) while a vCPU runs on that
memory: the daemon unmaps the host pages the running unicorn engine is using
-> SIGSEGV in kvmfs_vcpu_run (vcpu.py run_ioctl)."""
import signal
import threading
import time

from _common import MNT, abi, ioctl, os, spin_vm

signal.signal(signal.SIGUSR1, lambda *a: None)
kvm, vm, vcpu, mem = spin_vm()
mem.map[0x1000:0x1006] = bytes.fromhex("fe060020ebfa")      # inc byte [0x2000]; jmp $-4
runner = threading.Thread(target=lambda: ioctl(vcpu.fd, abi.KVM_RUN, 0), daemon=True)
runner.start()
time.sleep(0.2)
for _ in range(20):
    try:
        vm.invalidate(mem.address, mem.size)
    except OSError as e:
        print("invalidate:", e)
        break
    time.sleep(0.05)
try:
    os.listdir(MNT)
    print("daemon alive")
    signal.pthread_kill(runner.ident, signal.SIGUSR1)
except OSError as e:
    print("daemon gone:", e)
