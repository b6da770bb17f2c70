"""A process exits (or is killed) while one of its threads is in KVM_RUN: exit
closes the VM's last files, the daemon frees the VM and its vCPU while the
KVM_RUN request may still run the vCPU in another daemon thread.  A stress check
for the fuzzer's run_ioctl SIGSEGV rounds: it has not crashed the daemon here
yet (invalidate_during_run.py and view_during_close_uaf.py do, every time)."""
import threading
import time

from _common import MNT, abi, ioctl, os, spin_vm

for attempt in range(20):
    pid = os.fork()
    if pid == 0:
        kvm, vm, vcpu, mem = spin_vm()
        threading.Thread(target=lambda: ioctl(vcpu.fd, abi.KVM_RUN, 0), daemon=True).start()
        time.sleep(0.1)
        os._exit(0)                 # fds closed by exit while KVM_RUN is in the daemon
    os.waitpid(pid, 0)
    time.sleep(0.2)
    try:
        os.listdir(MNT)
    except OSError:
        print(f"daemon gone after {attempt + 1} tries")
        break
else:
    print("daemon survived")
