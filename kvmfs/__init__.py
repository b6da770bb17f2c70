"""kvmfs: the Linux KVM API in user space, as a FUSE filesystem that behaves like /dev/kvm."""
__version__ = "0.1.0"
