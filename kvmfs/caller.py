"""Who issues a request: the calling thread, its process and user.

fs.py builds one per FUSE request from libfuse's request context; the core
modules (vm.py, vcpu.py, commands.py) only read it.  A text command runs as a
`shell` caller: the VMs it creates belong to the user, not to the short-lived
process that wrote the command.
"""
import os

from kvmfs import procmem


def _never():
    return False


class Caller:
    """pid: the thread id FUSE reports (what process_vm_readv needs); tgid: its
    process; uid/gid; interrupted(): whether the caller's request was interrupted
    by a signal (FUSE INTERRUPT) before the handler could see it."""
    __slots__ = ("pid", "_tgid", "uid", "gid", "shell", "interrupted")

    def __init__(self, pid, uid, gid, tgid=None, shell=False, interrupted=_never):
        self.pid = pid
        self._tgid = tgid
        self.uid = uid
        self.gid = gid
        self.shell = shell
        self.interrupted = interrupted

    @property
    def tgid(self):
        """The caller's process id (looked up only when asked: ownership is checked
        through procmem.Process.owns, not through this number)."""
        if self._tgid is None:
            self._tgid = procmem.caller_tgid(self.pid) or self.pid
        return self._tgid

    @classmethod
    def this_process(cls):
        """The daemon itself (or a test) as the caller."""
        return cls(os.getpid(), os.getuid(), os.getgid(), tgid=os.getpid())

    def as_shell(self):
        return Caller(self.pid, self.uid, self.gid, self._tgid, True, self.interrupted)
