"""A client truncates its own vcpuK.run (O_TRUNC open, or ftruncate/truncate -s0):
the file is the daemon's tmpfs kvm_run area, so the next KVM_RUN writes through
a mapping past EOF and the whole daemon dies of SIGBUS (every VM of the mount)."""
from _common import MNT, abi, ioctl, os, spin_vm

kvm, vm, vcpu, mem = spin_vm()
os.close(os.open(os.path.join(vm.dir, "vcpu0.run"), os.O_RDWR | os.O_TRUNC))
os.truncate(os.path.join(vm.dir, "vcpu0.run"), 0)       # the same without O_TRUNC
ioctl(vcpu.fd, abi.KVM_RUN, 0)                           # daemon: Fatal Python error: Bus error
