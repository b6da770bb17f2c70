"""A vCPU's kvm_run area: the memory the VMM maps from its vCPU fd.

Two backings, one interface (`cdata`, `buffer`, `link`, `close()`):

- **the mount's own vCPU file** (`RunArea.of_mount`): the daemon maps
  MNT/vmN/vcpuK itself, so the page cache of that file is the area.  A VMM's
  mmap of its vCPU fd then shares those pages with the daemon, at KVM's offsets
  (kvm_run, the PIO page, the coalesced-MMIO ring), sized by
  KVM_GET_VCPU_MMAP_SIZE, and a mapping outlives the fd as KVM's does.  fs.py
  serves these files with the page cache kept (keep_cache, no direct_io) and the
  size and times fixed, so the kernel never drops it; runarea.c locks it.
- **a tmpfs file in the run directory** (`RunArea.tmpfs`): for VMs that no
  process owns (shell VMs: a daemon mapping of a mount file would keep the mount
  busy until destroy_vm) and for VMs without a mount (tests of the layers below
  fs.py).  Its unguessable name is told to the VM's owner only (vcpuK.run).

Both are registered with runarea.c's SIGBUS guard, which replaces a truncated
area instead of letting the daemon die.
"""
import mmap
import os

from kvmfs import _native as native, abi


class RunArea:
    """cdata (char * to the VCPU_MMAP_SIZE bytes), buffer (the same, sliceable), link
    (what MNT/vmN/vcpuK.run points to), path (the tmpfs file, None for a mount file)."""

    def __init__(self, cdata, buffer, link, path=None, tmpfs_map=None):
        self.cdata = cdata
        self.buffer = buffer
        self.link = link
        self.path = path
        self._tmpfs_map = tmpfs_map     # the mmap object whose buffer cdata pins
        native.runarea_add(cdata, abi.VCPU_MMAP_SIZE)

    @classmethod
    def of_mount(cls, vcpu_file):
        """The page cache of vcpu_file (MNT/vmN/vcpuK), mapped by the daemon itself."""
        cdata, buffer = native.runarea_map(vcpu_file, abi.VCPU_MMAP_SIZE)
        return cls(cdata, buffer, os.path.basename(vcpu_file))

    @classmethod
    def tmpfs(cls, run_dir, name, owner_uid=None):
        # An unguessable name: the run directory cannot be listed, and only the VM's
        # owner is told the name (fs.py answers readlink for it alone).
        path = os.path.join(run_dir, f"{name}-{os.urandom(12).hex()}.run")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, abi.VCPU_MMAP_SIZE)
            if owner_uid is not None:
                os.fchown(fd, owner_uid, -1)
            area = mmap.mmap(fd, abi.VCPU_MMAP_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        return cls(native.from_buffer(area), area, path, path, area)

    def close(self):
        native.runarea_remove(self.cdata)
        cdata, self.cdata, self.buffer = self.cdata, None, None
        if self._tmpfs_map is None:
            native.runarea_unmap(cdata, abi.VCPU_MMAP_SIZE)
            return
        del cdata                       # the last export of the mmap's buffer
        self._tmpfs_map.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
