"""A signal that reaches KVM_RUN before the vCPU is in the guest is lost: FUSE
sends one INTERRUPT per request, the daemon drops it, later signals are not
forwarded, and the client thread sits in the kernel (state D, request_wait_answer)
until the daemon dies.  Run on a `jmp $` guest, signalled 0-1 ms after it starts.
When it reproduces, this process stays a zombie until the mount is unmounted
(fusermount -uz MNT) and the daemon killed."""
import signal
import threading
import time

from _common import abi, ioctl, spin_vm

signal.signal(signal.SIGUSR1, lambda *a: None)
kvm, vm, vcpu, mem = spin_vm()
for attempt in range(200):
    done = threading.Event()

    def _run():
        try:
            ioctl(vcpu.fd, abi.KVM_RUN, 0)
        except OSError:
            pass
        done.set()
    t = threading.Thread(target=_run, daemon=True)
    t.start()
    end = time.monotonic() + 10
    while not done.is_set() and time.monotonic() < end:
        signal.pthread_kill(t.ident, signal.SIGUSR1)     # at once, then every 20 ms
        done.wait(0.02)
    if not done.is_set():
        with open(f"/proc/self/task/{t.native_id}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        print(f"run {attempt}: KVM_RUN still in the kernel after 10 s of signals (state {state})")
        break
else:
    print("every KVM_RUN ended")
