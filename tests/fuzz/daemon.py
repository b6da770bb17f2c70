"""Run the kvmfs daemon for the fuzzer: `kvmfs mount --foreground`, with Python's
fault handler on (a crash prints every thread's Python stack to stderr) and
SIGUSR2 bound to an all-threads stack dump, so a hang can be looked at from
outside without stopping the daemon.

    python -X faulthandler tests/fuzz/daemon.py mount --foreground --log LOG MNT
"""
import faulthandler
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

faulthandler.enable(all_threads=True)
faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)

from kvmfs.cli import main  # noqa: E402  (after the handlers: a crash at import shows too)

sys.exit(main(sys.argv[1:]))
