"""The project's exceptions.  Core modules raise KvmError(errno, op, detail);
only fs.py turns it into a FUSE errno reply."""
import errno as _errno
import os


class KvmfsError(Exception):
    """Root of kvmfs's exceptions; never raised bare."""


class KvmError(KvmfsError, OSError):
    """An errno a caller observes, with the operation that produced it.

    `warn` marks malformed requests worth one line in the daemon log; the
    errors a well-behaved VMM provokes on purpose (EEXIST probing, ENOENT on
    an idle dirty log) are logged at debug level only.
    """

    def __init__(self, errno, op, detail="", warn=True):
        OSError.__init__(self, errno, os.strerror(errno))
        self.op = op
        self.detail = detail
        self.warn = warn

    def __str__(self):
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.op}: {name}" + (f" ({self.detail})" if self.detail else "")


def check(cond, errno, op, detail=""):
    """Raise KvmError unless cond holds (kernel style: check first, then change)."""
    if not cond:
        raise KvmError(errno, op, detail)
