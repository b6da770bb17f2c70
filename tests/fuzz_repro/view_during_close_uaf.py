"""Views read a VM's native MMU with no reference on the VM: reading
MNT/info/json (or vmN/info/memslots) while another thread closes the VM's last
file lets destroy() free the MMU under kvmfs_memslot_list -> the daemon dies of
SIGSEGV in views (vm.py slots())."""
import threading

from _common import Kvm, MNT, alloc_guest_memory, os

kvm = Kvm(MNT)
mem = alloc_guest_memory(0x100000)
stop = threading.Event()


def churn():
    while not stop.is_set():
        vm = kvm.create_vm()
        for slot in range(8):
            vm.set_user_memory_region(slot, 0, slot << 17, 0x10000, mem.address)
        vm.close()                          # last file: the VM and its MMU are freed


threads = [threading.Thread(target=churn) for _ in range(2)]
for t in threads:
    t.start()
try:
    for i in range(3000):
        with open(os.path.join(MNT, "info", "json")) as f:
            f.read()
except OSError as e:
    print(f"after {i} reads: {e}")           # ENOTCONN: the daemon is gone
finally:
    stop.set()
    for t in threads:
        t.join(5)
try:
    os.listdir(MNT)
    print("daemon alive")
except OSError as e:
    print("daemon gone:", e)
