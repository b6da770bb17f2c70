"""A bounded run of the stateful fuzzer (tests/fuzz/fuzz.py) against its own mount.

Part of `make test` (KVMFS_FUZZ=0 skips it); `make fuzz` runs the fuzzer longer.
KVMFS_FUZZ_SECONDS (default 20) and KVMFS_FUZZ_SEED (default 1) choose the run;
a failure names each distinct finding and the command that replays it.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, _fuse_unusable, daemon_env, skip_or_fail

pytestmark = pytest.mark.skipif(os.environ.get("KVMFS_FUZZ", "1") == "0",
                                reason="KVMFS_FUZZ=0")


def test_fuzz_finds_no_crash_hang_traceback_or_leak(tmp_path):
    why = _fuse_unusable()
    if why:
        skip_or_fail("KVMFS_REQUIRE_FUSE", why)
    seconds = os.environ.get("KVMFS_FUZZ_SECONDS", "20")
    seed = os.environ.get("KVMFS_FUZZ_SEED", "1")
    summary = tmp_path / "summary.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fuzz", "fuzz.py"),
                        "--seconds", seconds, "--seed", seed, "--no-minimize",
                        "--out", str(tmp_path / "out"), "--json", str(summary)],
                       cwd=REPO, env=daemon_env(), capture_output=True, text=True,
                       timeout=float(seconds) + 600)
    assert summary.exists(), p.stdout + p.stderr
    s = json.loads(summary.read_text())
    counts = s["counts"]
    report = "\n".join(f"[{f['kind']}] {f['signature']} (seed {f['seed']} round {f['round']}): "
                       f"{sys.executable} tests/fuzz/fuzz.py --replay "
                       f"{tmp_path}/out/findings/{f['name']}.json"
                       for f in s["distinct"])
    assert s["rounds"] > 0, p.stdout + p.stderr
    for kind in ("crash", "hang", "traceback", "ior-leak", "mount-dead"):
        assert counts.get(kind, 0) == 0, f"{kind}: {counts}\n{report}\n{p.stdout[-4000:]}"
