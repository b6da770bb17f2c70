"""The FUSE front-end: the mounted tree, open/read/write/ioctl, and the request loop.

Owns: the path tree, open-file handles, the worker threads.  The only module
that imports fuse; everything below it raises KvmError, turned into an errno
reply here (and logged once: a warning for a malformed request, the traceback
plus EIO for a bug).

The tree (one directory per object; the ioctl endpoint of each has one name):
    kvm                  system ioctls (the /dev/kvm analogue)
    cmd                  system commands as text, one a line
    vmN/ctl              VM ioctls          vmN/cmd   the same as text
    vmN/vcpuK            vCPU ioctls; mmap it for the kvm_run area (runarea.py)
    vmN/vcpuK.cmd        the same as text
    vmN/vcpuK.run        a link to the kvm_run area: to vcpuK, or for a shell VM to
                         a tmpfs file
    vmN/mem, vmN/as1/mem guest-physical memory, offset = gpa
    vmN/info/...         read-only text views

Request loop: libfuse2's high-level library decodes requests, but the threads
that read /dev/fuse are Python threads started here, not libfuse's: a callback
into Python from a thread Python already knows costs no thread-state set-up,
which is what makes fusepy's own multi-threaded loop twice as slow as its
single-threaded one.  A pool keeps at least one idle reader, so a long KVM_RUN
never stalls other requests.
"""
import ctypes
import errno
import logging
import os
import stat
import threading
import time
import traceback

import fuse as fusepy

from kvmfs import abi, commands, ioctls, launchers, procmem, views
from kvmfs.caller import Caller
from kvmfs.errors import KvmError

log = logging.getLogger("kvmfs.fs")

_lib = fusepy._libfuse
_lib.fuse_setup.restype = ctypes.c_void_p
_lib.fuse_setup.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                            ctypes.POINTER(fusepy.fuse_operations), ctypes.c_size_t,
                            ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int),
                            ctypes.c_void_p]
_lib.fuse_get_session.restype = ctypes.c_void_p
_lib.fuse_get_session.argtypes = [ctypes.c_void_p]
_lib.fuse_session_next_chan.restype = ctypes.c_void_p
_lib.fuse_session_next_chan.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_lib.fuse_chan_bufsize.restype = ctypes.c_size_t
_lib.fuse_chan_bufsize.argtypes = [ctypes.c_void_p]
_lib.fuse_chan_recv.restype = ctypes.c_int
_lib.fuse_chan_recv.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]
_lib.fuse_session_process.restype = None
_lib.fuse_session_process.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
_lib.fuse_session_exited.restype = ctypes.c_int
_lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
_lib.fuse_session_exit.restype = None
_lib.fuse_session_exit.argtypes = [ctypes.c_void_p]
_lib.fuse_teardown.restype = None
_lib.fuse_teardown.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_get_context = _lib.fuse_get_context

_lib.fuse_interrupted.restype = ctypes.c_int
_lib.fuse_interrupted.argtypes = []

# Kinds of node
DIR, SYSTEM, SYSCMD, VMCTL, VMCMD, VCPU, VCPUCMD, RUNLINK, MEM, VIEW = range(10)
FD_KIND = {SYSTEM: ioctls.SYSTEM, VMCTL: ioctls.VM, VCPU: ioctls.VCPU}
REF_KINDS = (VMCTL, VCPU)           # the files that stand for KVM's VM and vCPU fds
OWNER_KINDS = (MEM, RUNLINK)        # files that reach guest state: the VM's owner only
CMD_KINDS = (SYSCMD, VMCMD, VCPUCMD)


def _interrupted():
    return _lib.fuse_interrupted() != 0


def caller():
    """The Caller of the FUSE request this thread is serving."""
    c = _get_context().contents
    return Caller(c.pid, c.uid, c.gid, interrupted=_interrupted)


class Node:
    __slots__ = ("kind", "vm", "vcpu", "as_id", "view")

    def __init__(self, kind, vm=None, vcpu=None, as_id=0, view=None):
        self.kind, self.vm, self.vcpu, self.as_id, self.view = kind, vm, vcpu, as_id, view


class Handle:
    """An open file.  It holds its VM (Vm.hold) until released, so nothing it can
    reach is freed under a request; a VM or vCPU file also counts as a KVM fd."""
    __slots__ = ("node", "obj", "kind", "vm", "reply", "cursor", "view", "internal",
                 "acting_for", "invalidations")

    def __init__(self, node, obj, internal=False):
        self.internal = internal   # the daemon's own mapping of a kvm_run area: holds nothing
        self.node = node
        self.obj = obj
        self.kind = FD_KIND.get(node.kind)
        self.vm = node.vm
        self.reply = None        # text-command answer waiting to be read
        self.cursor = 0          # how much of it was read: answers ignore the file offset,
                                 # which the command written before them has moved
        self.view = None         # a view's reader (views.Fixed or views.Streamed)
        self.acting_for = None   # KVMFS_ACT_FOR: the Caller its requests act for
        self.invalidations = None    # KVMFS_MMU_NOTIFY STARTs not ended yet


def _check_truncatable(node, op, what):
    """Only text-command files and guest memory take a (meaningless) truncation; the
    rest answer EINVAL, as KVM's anon inodes do (a vCPU file's size is its mapping)."""
    if node.kind not in CMD_KINDS + (MEM,):
        raise KvmError(errno.EINVAL, op, what, warn=False)


def _parse_id(name, prefix):
    rest = name[len(prefix):]
    if name.startswith(prefix) and rest.isdigit() and (rest == "0" or rest[0] != "0"):
        return int(rest)
    return None


class KvmFs:
    """The operations behind the mount (called from fuse_operations callbacks).

    Access (the /dev/kvm model): MNT/kvm and MNT/cmd belong to the user who
    mounted, mode access_mode (0600 unless --mode/--group open it); everything
    of a VM belongs to the VM's owner, mode 0600 (views 0400): the kernel checks
    these (default_permissions), and the daemon checks the owner itself where a
    user is not enough (guest memory and kvm_run: the owning process only).
    """

    def __init__(self, system, access_mode=0o600, access_gid=None):
        self.system = system
        self.handles = {}
        self.next_fh = 1
        self.fh_lock = threading.Lock()
        self.mount_time = time.time()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.access_mode = access_mode
        self.access_gid = self.gid if access_gid is None else access_gid
        self.reported = set()    # (fd kind, ioctl) not answered, logged once each

    # --- the tree ---------------------------------------------------------------------
    def resolve(self, path):
        parts = [p for p in path.split("/") if p]
        if not parts:
            return Node(DIR)
        if len(parts) == 1:
            if parts[0] == "kvm":
                return Node(SYSTEM)
            if parts[0] == "cmd":
                return Node(SYSCMD)
            if parts[0] == "info":
                return Node(DIR, view="system")
        if parts[0] == "info" and len(parts) == 2 and parts[1] in views.SYSTEM_VIEWS:
            return Node(VIEW, view=parts[1])
        vm_id = _parse_id(parts[0], "vm")
        if vm_id is None:
            return None
        vm = self.system.vms.get(vm_id)
        if vm is None or vm.dead:
            return None
        if len(parts) == 1:
            return Node(DIR, vm)
        name = parts[1]
        if len(parts) == 2:
            if name == "ctl":
                return Node(VMCTL, vm)
            if name == "cmd":
                return Node(VMCMD, vm)
            if name == "mem":
                return Node(MEM, vm, as_id=0)
            if name in ("as1", "info"):
                return Node(DIR, vm, view=name)
            for suffix, kind in ((".run", RUNLINK), (".cmd", VCPUCMD), ("", VCPU)):
                if name.endswith(suffix):
                    k = _parse_id(name[:len(name) - len(suffix)] if suffix else name, "vcpu")
                    vcpu = vm.vcpus.get(k) if k is not None else None
                    if vcpu is not None:
                        return Node(kind, vm, vcpu)
                    if kind == VCPU and k in vm.creating:    # its kvm_run area being mapped
                        return Node(kind, vm)
            return None
        if len(parts) == 3 and name == "as1" and parts[2] == "mem":
            return Node(MEM, vm, as_id=1)
        if name == "info":
            view = "/".join(parts[2:])
            if view in views.VM_DIRS:
                return Node(DIR, vm, view=view)
            if views.exists(vm, view):
                return Node(VIEW, vm, view=view)
        return None

    def listdir(self, node):
        if node.vm is None:
            if node.view == "system":
                return list(views.SYSTEM_VIEWS)
            return ["kvm", "cmd", "info"] + [f"vm{i}" for i, _ in self.system.live_vms()]
        vm = node.vm
        if node.view == "as1":
            return ["mem"]
        if node.view is not None:
            return views.listdir(vm, node.view)
        names = ["ctl", "cmd", "mem", "as1", "info"]
        for k in sorted(vm.vcpus):
            names += [f"vcpu{k}", f"vcpu{k}.run", f"vcpu{k}.cmd"]
        return names

    # --- operations -------------------------------------------------------------------
    def getattr(self, path):
        node = self.resolve(path)
        if node is None:
            raise KvmError(errno.ENOENT, "lookup", path, warn=False)
        t = self.mount_time
        st = {"st_atime": t, "st_mtime": t, "st_ctime": t, "st_uid": self.uid, "st_gid": self.gid,
              "st_nlink": 1, "st_size": 0}
        if node.vm is not None:
            if node.vm.owner_uid is not None:
                st["st_uid"] = node.vm.owner_uid
            mode = {DIR: stat.S_IFDIR | 0o700, RUNLINK: stat.S_IFLNK | 0o777,
                    VIEW: stat.S_IFREG | 0o400}.get(node.kind, stat.S_IFREG | 0o600)
        elif node.kind == DIR:
            mode = stat.S_IFDIR | 0o755
        elif node.kind == VIEW:
            mode = stat.S_IFREG | 0o444
        else:                                   # kvm, cmd: the /dev/kvm node
            st["st_gid"] = self.access_gid
            mode = stat.S_IFREG | self.access_mode
        st["st_mode"] = mode
        if node.kind == DIR:
            st["st_nlink"] = 2
        elif node.kind == RUNLINK:
            st["st_size"] = len(node.vcpu.run_area.link)
        elif node.kind == VCPU:
            st["st_size"] = abi.VCPU_MMAP_SIZE      # mmap beyond it: SIGBUS, as KVM
        return st

    def _check_vcpu_opener(self, ctx, node, path):
        """A vCPU file maps the vCPU's kvm_run area: only its VM's owner opens it (KVM
        hands the fd to the creator alone), or a process that may act for the owner
        (launchers.py: root, a same-user ancestor, such as kvmfs run's supervisor)."""
        vm = node.vm
        if vm.shell_owned:
            ok = ctx.uid in (vm.owner_uid, 0)
        else:
            ok = vm.owner.owns(ctx.pid) or launchers.may_act_for(ctx, vm.owner.tgid)
        if not ok:
            raise KvmError(errno.EACCES, "open", f"{path}: vm{vm.id} belongs to pid "
                           f"{vm.owner_pid}, not to the process of thread {ctx.pid}")

    def _check_owner(self, node, op):
        node.vm.check_owner(caller(), op)

    def readlink(self, path):
        node = self.resolve(path)
        if node is None or node.kind != RUNLINK:
            raise KvmError(errno.EINVAL, "readlink", path, warn=False)
        try:
            self._check_owner(node, "readlink")
        except KvmError as e:
            raise KvmError(errno.EACCES, "readlink", f"{path}: {e.detail}")
        return node.vcpu.run_area.link

    def open(self, path, flags):
        node = self.resolve(path)
        if node is None:
            raise KvmError(errno.ENOENT, "open", path, warn=False)
        if node.kind == DIR:
            raise KvmError(errno.EISDIR, "open", path, warn=False)
        if node.kind == VIEW and flags & (os.O_WRONLY | os.O_RDWR):
            raise KvmError(errno.EACCES, "open", f"{path} is read-only", warn=False)
        if node.kind in OWNER_KINDS:
            try:
                self._check_owner(node, "open")
            except KvmError as e:
                raise KvmError(errno.EACCES, "open", f"{path}: {e.detail}")
        if node.kind == VCPU:
            ctx = caller()
            if ctx.pid in self.system.internal_tids:
                return self._new_handle(Handle(node, None, internal=True))
            if node.vcpu is None:
                raise KvmError(errno.ENOENT, "open", path, warn=False)
            self._check_vcpu_opener(ctx, node, path)
        obj = {SYSTEM: self.system, SYSCMD: self.system, VMCTL: node.vm, VMCMD: node.vm,
               VCPU: node.vcpu, VCPUCMD: node.vcpu}.get(node.kind)
        h = Handle(node, obj)
        if node.vm is not None and not node.vm.hold():
            raise KvmError(errno.ENOENT, "open", f"{path}: the VM is gone", warn=False)
        try:
            if node.kind == VIEW:
                h.view = views.open_view(self.system, node.vm, node.view, caller())
            if node.kind in REF_KINDS:
                node.vm.get_ref()
        except BaseException:
            if node.vm is not None:
                node.vm.unhold()
            raise
        return self._new_handle(h)

    def opendir(self, path):
        node = self.resolve(path)
        if node is None:
            raise KvmError(errno.ENOENT, "opendir", path, warn=False)
        if node.kind != DIR:
            raise KvmError(errno.ENOTDIR, "opendir", path, warn=False)
        return self._new_handle(Handle(Node(DIR, view=node.view), None) if node.vm is None
                                else Handle(node, None), hold=False)

    def _new_handle(self, h, hold=True):
        with self.fh_lock:
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = h
        return fh

    def release(self, fh):
        with self.fh_lock:
            h = self.handles.pop(fh, None)
        if h is None or h.internal:
            return
        if h.invalidations is not None:
            h.invalidations.release()
        if h.node.kind in REF_KINDS:
            h.vm.put_ref()
        if h.vm is not None:
            h.vm.unhold()

    def releasedir(self, fh):
        with self.fh_lock:
            self.handles.pop(fh, None)

    def readdir(self, fh):
        h = self.handles[fh]
        node = h.node
        if node.vm is not None and node.vm.dead:
            return []
        return self.listdir(node)

    def read(self, fh, size, offset):
        h = self.handles[fh]
        kind = h.node.kind
        if kind == MEM:
            self._check_owner(h.node, "read guest memory")
            return h.vm.access_gpa(h.node.as_id, offset, size)
        if kind == VIEW:
            return h.view.read(offset, size)
        if kind == VCPU:        # the page cache's first fill: runarea.c zeroes it anyway
            return bytes(max(0, min(size, abi.VCPU_MMAP_SIZE - offset)))
        if kind in CMD_KINDS:
            if h.reply is None:
                h.reply = commands.last_reply(h.obj)
            text = h.reply.encode()[h.cursor:h.cursor + size]
            h.cursor += len(text)
            return text
        raise KvmError(errno.EINVAL, "read", "not a readable file", warn=False)

    def write(self, fh, data, offset):
        h = self.handles[fh]
        kind = h.node.kind
        if kind == MEM:
            self._check_owner(h.node, "write guest memory")
            return h.vm.access_gpa(h.node.as_id, offset, len(data), data)
        if kind == VCPU:        # writeback of the kvm_run pages: they are the area already
            return len(data)
        if kind in CMD_KINDS:
            h.reply, h.cursor = None, 0
            h.reply = commands.execute(h.obj, caller(), data.decode(errors="replace"))
            return len(data)
        raise KvmError(errno.EINVAL, "write", "not a writable file", warn=False)

    def truncate(self, path):
        node = self.resolve(path)
        if node is None:
            raise KvmError(errno.ENOENT, "truncate", path, warn=False)
        _check_truncatable(node, "truncate", path)

    def ftruncate(self, fh):
        _check_truncatable(self.handles[fh].node, "ftruncate", "not a file that can be truncated")

    def is_page_cached(self, fh):
        """vCPU files keep their page cache (it is the kvm_run area): every open of one
        must say so, or the kernel would drop the pages the daemon has mapped."""
        return self.handles[fh].node.kind == VCPU

    def ioctl(self, fh, cmd, arg, data):
        """One ioctl on an open file: owner check, then the handler of the table's row.

        `data` is libfuse's buffer of ioc_size(cmd) bytes: the caller's struct for
        _IOW/_IOWR, uninitialised for _IOR; whatever it holds when this returns is
        copied back to the caller for _IOR/_IOWR, even with an error (see
        ioctl_cb, which restores the caller's bytes then).
        """
        h = self.handles[fh]
        ctx = h.acting_for or caller()
        if h.kind is None or h.internal:
            raise KvmError(errno.ENOTTY, "ioctl", f"{ioctls.name_of(cmd)} on a file that takes none",
                           warn=False)
        if cmd == abi.KVMFS_ACT_FOR:
            h.acting_for = launchers.act_for(caller(), data)
            return 0
        if cmd == abi.KVMFS_MMU_NOTIFY and h.kind == ioctls.SYSTEM:
            with self.fh_lock:
                if h.invalidations is None:
                    h.invalidations = launchers.Invalidations()
            return h.invalidations.notify(self.system, ctx, data)
        if h.kind != ioctls.SYSTEM:
            h.vm.check_owner(ctx)
        row = ioctls.BY_FD[h.kind].get(cmd)
        if row is None:
            key = (h.kind, cmd)
            if key not in self.reported:
                self.reported.add(key)
                log.info("%s on a %s fd: not implemented", ioctls.name_of(cmd), h.kind)
            raise KvmError(ioctls.UNKNOWN_ERRNO[h.kind], "ioctl", ioctls.name_of(cmd), warn=False)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s on %s fd (pid %d, arg 0x%x)", row.name, h.kind, ctx.pid, arg)
        return getattr(h.obj, row.handler)(ctx, arg, data)


# ------------------------------------------------------------------------------------
# libfuse glue: the fuse_operations table and the worker pool.

def _errno_of(exc, op):
    if isinstance(exc, KvmError):
        if exc.warn:
            log.warning("%s", exc)
        else:
            log.debug("%s", exc)
        return exc.errno
    log.error("bug in %s: %s\n%s", op, exc, traceback.format_exc())
    return errno.EIO


def _ioctl_shape(cmd):
    """(argument size, copied back to the caller, starts uninitialised) of an ioctl number."""
    size, direction = abi.ioc_size(cmd), abi.ioc_dir(cmd)
    readback = bool(size and direction & abi.IOC_READ)
    return size, readback, readback and not direction & abi.IOC_WRITE


def _restore_caller_bytes(data, addr, size):
    """Put the caller's current bytes at addr into libfuse's reply buffer (zeros if
    they cannot be read), so that the copy-out after an error changes nothing."""
    try:
        ctypes.memmove(data, procmem.read(_get_context().contents.pid, addr, size), size)
    except (KvmError, OSError):
        ctypes.memset(data, 0, size)


def _fill_stat(st, attrs):
    for k, v in attrs.items():
        if k.endswith("time"):
            ts = getattr(st, k + "spec")
            ts.tv_sec = int(v)
            ts.tv_nsec = int((v - int(v)) * 1e9)
        else:
            setattr(st, k, v)


def build_operations(fs):
    """The fuse_operations table; each callback returns 0/count or -errno."""
    ops = fusepy.fuse_operations
    t = dict((f[0], f[1]) for f in ops._fields_)

    debug = log.isEnabledFor(logging.DEBUG)      # --debug: every request in the log

    def guarded(name):
        def deco(fn):
            def cb(*args):
                if debug:
                    log.debug("%s %s (pid %d)", name, args[0].decode(errors="replace")
                              if isinstance(args[0], bytes) else "", _get_context().contents.pid)
                try:
                    return fn(*args)
                except BaseException as e:  # noqa: BLE001 -- every failure becomes an errno
                    return -_errno_of(e, name)
            return t[name](cb)
        return deco

    @guarded("getattr")
    def getattr_cb(path, stp):
        ctypes.memset(stp, 0, ctypes.sizeof(fusepy.c_stat))
        _fill_stat(stp.contents, fs.getattr(path.decode()))
        return 0

    @guarded("readlink")
    def readlink_cb(path, buf, size):
        target = fs.readlink(path.decode()).encode()[:size - 1] + b"\0"
        ctypes.memmove(buf, target, len(target))
        return 0

    @guarded("open")
    def open_cb(path, fip):
        fi = fip.contents
        fi.fh = fs.open(path.decode(), fi.flags)
        if fs.is_page_cached(fi.fh):
            fi.keep_cache = 1
        else:
            fi.direct_io = 1      # views and memory change under the reader: no page cache
        return 0

    @guarded("release")
    def release_cb(path, fip):
        fs.release(fip.contents.fh)
        return 0

    @guarded("read")
    def read_cb(path, buf, size, offset, fip):
        data = fs.read(fip.contents.fh, size, offset)
        ctypes.memmove(buf, data, len(data))
        return len(data)

    @guarded("write")
    def write_cb(path, buf, size, offset, fip):
        return fs.write(fip.contents.fh, ctypes.string_at(buf, size), offset)

    @guarded("truncate")
    def truncate_cb(path, length):
        fs.truncate(path.decode())
        return 0

    @guarded("ftruncate")
    def ftruncate_cb(path, length, fip):
        fs.ftruncate(fip.contents.fh)
        return 0

    @guarded("opendir")
    def opendir_cb(path, fip):
        fip.contents.fh = fs.opendir(path.decode())
        return 0

    @guarded("readdir")
    def readdir_cb(path, buf, filler, offset, fip):
        for name in [".", ".."] + fs.readdir(fip.contents.fh):
            if filler(buf, name.encode(), None, 0) != 0:
                break
        return 0

    @guarded("releasedir")
    def releasedir_cb(path, fip):
        fs.releasedir(fip.contents.fh)
        return 0

    @guarded("utimens")
    def utimens_cb(path, times):
        return 0

    def ioctl_cb(path, cmd, arg, fip, flags, data):
        # libfuse replies with the whole out buffer even when the result is an error,
        # and the kernel copies it to the caller before returning the errno.  So an
        # _IOR buffer (uninitialised heap) starts zeroed, and after an error the
        # caller's own bytes are put back: a failed ioctl leaves the caller's memory
        # as it was, as in KVM, and never shows it daemon memory.
        cmd &= 0xFFFFFFFF
        shape = shapes.get(cmd)
        if shape is None:
            shape = _ioctl_shape(cmd)
            if len(shapes) < 1024:            # bounded: callers choose the numbers
                shapes[cmd] = shape
        size, readback, zero = shape if data else (0, False, False)
        if zero:
            ctypes.memset(data, 0, size)
        try:
            return fs.ioctl(fip.contents.fh, cmd, arg or 0, data)
        except BaseException as e:  # noqa: BLE001 -- every failure becomes an errno
            err = _errno_of(e, "ioctl")
        if readback:
            _restore_caller_bytes(data, arg or 0, size)
        return -err

    shapes = {}                 # ioctl number -> _ioctl_shape, for the numbers seen first
    ioctl_cb = t["ioctl"](ioctl_cb)
    table = ops()
    for name, cb in (("getattr", getattr_cb), ("readlink", readlink_cb), ("open", open_cb),
                     ("release", release_cb), ("read", read_cb), ("write", write_cb),
                     ("truncate", truncate_cb), ("ftruncate", ftruncate_cb),
                     ("opendir", opendir_cb), ("readdir", readdir_cb),
                     ("releasedir", releasedir_cb), ("utimens", utimens_cb), ("ioctl", ioctl_cb)):
        setattr(table, name, cb)
    table.flag_nullpath_ok = 1
    table.flag_nopath = 1          # fh-based operations need no path: libfuse skips building it
    return table


class Server:
    """A mounted kvmfs: libfuse session plus a pool of Python reader threads.

    Pool rule: a worker that takes a request and leaves no idle reader behind
    starts another, up to max_workers; more than max_idle idle readers end.
    """

    def __init__(self, fs, mountpoint, options=("intr",), max_workers=256, max_idle=4):
        self.fs = fs
        self.ops = build_operations(fs)
        self.mountpoint = mountpoint
        self.max_workers = max_workers
        self.max_idle = max_idle
        self.lock = threading.Lock()
        self.idle = 0
        self.workers = 0
        self.done = threading.Event()
        self.gone = threading.Event()         # every worker has left the request loop
        # allow_other only when asked (the CLI does for --mode/--group): by default
        # only the user who mounted reaches the mount at all, as /dev/kvm is 0600.
        opts = ",".join(("fsname=kvmfs", "subtype=kvmfs", "default_permissions") + tuple(options))
        args = [b"kvmfs", b"-f", b"-o", opts.encode(), mountpoint.encode()]
        self._argv = (ctypes.c_char_p * len(args))(*args)
        self._mnt = ctypes.c_char_p()
        mt = ctypes.c_int()
        self.fuse = _lib.fuse_setup(len(args), self._argv, ctypes.byref(self.ops),
                                    ctypes.sizeof(self.ops), ctypes.byref(self._mnt),
                                    ctypes.byref(mt), None)
        if not self.fuse:
            raise OSError(errno.EIO, f"cannot mount kvmfs on {mountpoint}")
        self.session = _lib.fuse_get_session(self.fuse)
        self.chan = _lib.fuse_session_next_chan(self.session, None)
        self.bufsize = _lib.fuse_chan_bufsize(self.chan)

    def _spawn(self):
        self.workers += 1
        self.idle += 1
        threading.Thread(target=self._worker, name=f"fuse-{self.workers}", daemon=True).start()

    def _worker(self):
        buf = ctypes.create_string_buffer(self.bufsize)
        chan = ctypes.c_void_p(self.chan)
        while not _lib.fuse_session_exited(self.session):
            res = _lib.fuse_chan_recv(ctypes.byref(chan), buf, self.bufsize)
            if res == -errno.EINTR or res == -errno.EAGAIN:
                continue
            if res <= 0:                      # unmounted
                break
            with self.lock:
                self.idle -= 1
                if self.idle == 0 and self.workers < self.max_workers:
                    self._spawn()
            _lib.fuse_session_process(self.session, buf, res, chan)
            with self.lock:
                if self.idle >= self.max_idle:
                    self._leave()
                    return
                self.idle += 1
        _lib.fuse_session_exit(self.session)
        self.done.set()
        with self.lock:
            self.idle -= 1
            self._leave()

    def _leave(self):
        """A worker ends (lock held); the last one lets serve() free the session."""
        self.workers -= 1
        if self.workers == 0:
            self.gone.set()

    def serve(self, reaper_interval=1.0):
        """Serve until unmounted; every reaper_interval free VMs whose creator died."""
        with self.lock:
            self._spawn()
        while not self.done.wait(reaper_interval) and not _lib.fuse_session_exited(self.session):
            try:
                self.fs.system.reap()
            except Exception:  # noqa: BLE001 -- a reaper bug must not stop the mount
                log.exception("reaper")
        self.fs.system.destroy_all()          # kicks vCPUs out of KVM_RUN: their workers end
        # Every worker must be out of libfuse before the session is freed: one still
        # reading /dev/fuse would use it after fuse_teardown (a crash at unmount).
        if not self.gone.wait(10):
            log.warning("%d FUSE workers still busy at unmount", self.workers)
        _lib.fuse_teardown(self.fuse, self._mnt)
