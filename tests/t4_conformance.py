"""Conformance: the table of tests/conformance.py on real KVM and on kvmfs.

Three tests per case:
- test_kvm: the host's /dev/kvm gives the spec's answer (for this kind of host);
- test_kvmfs: kvmfs gives the spec's answer (the ABI's, or kvmfs's documented one);
- test_kvmfs_same_as_kvm: kvmfs and real KVM give the same answer, for every case
  where both owe the same one on this host (host-specific cases and cases where
  kvmfs differs on purpose are left out; the first two tests still check them).
So a case cannot pass by both sides being wrong the same way.

Each case runs once per backend per session; the comparison reuses the results.
"""
import pytest

import conformance
from conformance import CASES, Kvmfs, RealKvm, host_kind, run_case

HOST = host_kind()
_results = {}


def _ids(c):
    return c.name


def result(backend, case):
    key = (backend.name, case.name)
    if key not in _results:
        _results[key] = run_case(backend, case)
    return _results[key]


@pytest.fixture(scope="module")
def kvm(real_kvm):
    return RealKvm(real_kvm)


@pytest.fixture(scope="module")
def kvmfs(mounted):
    return Kvmfs(mounted)


def _explain(case, got, want, side):
    return (f"{case.name} on {side}: got {got!r}, spec says {want!r}\n"
            f"  ({case.why})")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kvm(kvm, case):
    want = case.expected_kvm(HOST)
    got = result(kvm, case)
    assert got == want, _explain(case, got, want, f"/dev/kvm ({HOST} host)")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kvmfs(kvmfs, case, expect_log):
    expect_log.errnos(case.expected_kvmfs())
    want = case.expected_kvmfs()
    got = result(kvmfs, case)
    assert got == want, _explain(case, got, want, "kvmfs")


@pytest.mark.parametrize("case", [c for c in CASES if c.comparable(HOST)], ids=_ids)
def test_kvmfs_same_as_kvm(kvm, kvmfs, case, expect_log):
    expect_log.errnos(case.expected_kvmfs())
    theirs = result(kvm, case)
    ours = result(kvmfs, case)
    assert ours == theirs, (f"{case.name}: kvmfs {ours!r} != /dev/kvm {theirs!r}\n"
                            f"  ({case.why})")


def test_table_is_well_formed():
    """Every case has a unique name and a reason; host-specific ones name a host kind."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert c.why, c.name
        assert set(c.host) <= {"pvm", "vmx", "svm"}, c.name
        assert c.expected_kvmfs() is not conformance.SAME
