"""Numbers that do not fit: `invalidate` with a 65-bit size and `test_young` with a
negative gfn raise OverflowError in the daemon (traceback, EIO) instead of EINVAL."""
from _common import Kvm, MNT, os

vm = Kvm(MNT).create_vm()
for line in ("invalidate 0x1000 0x" + "f" * 40, "test_young 0 -1 1", "clear_young -1 0 1",
             "invalidate -1 4096"):
    try:
        with open(os.path.join(vm.dir, "cmd"), "w") as f:
            f.write(line + "\n")
    except OSError as e:
        print(line[:40], e)
