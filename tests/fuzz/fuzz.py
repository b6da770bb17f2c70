"""Stateful fuzzer for kvmfs: random rounds of ioctls, file operations, text
commands, forks and threads against a daemon it mounts itself.

    python tests/fuzz/fuzz.py --seconds 60 [--seed S] [--hang 15] [--out DIR]
    python tests/fuzz/fuzz.py --replay DIR/findings/NAME.json [--gdb]
    python tests/fuzz/fuzz.py --seconds 20 --json summary.json --no-minimize   (tests/t7_fuzz.py)

One round = one client process (worker.py) running a list of actions generated
from seed "S.R" (gen.py); forked children and threads are part of the round.
After each round the daemon is checked: its process is alive, `stat MNT/kvm`
answers, and its log has no traceback, "bug in" or ERROR line.  Every action is
timed from here: one in flight longer than --hang seconds is a hang (with the
client's kernel state: D = uninterruptible, its wchan and stack) and the
daemon's Python stacks (SIGUSR2, see daemon.py).  A finding prints its seed,
round and a replayable trace file; distinct findings are then shrunk by
replaying parts of the round (delta debugging) and the shortest reproducing
trace is kept.  RSS, mappings, threads and fds of the daemon are sampled after
every round; the summary reports their growth.

Exit status: 0 when there was no crash, hang, traceback or leaked buffer; 1 otherwise.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gen  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
BAD_LOG = re.compile(r"Traceback|bug in| ERROR ")
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ", re.M)
SEVERE = ("crash", "hang", "traceback", "ior-leak", "mount-dead")


def now():
    return time.monotonic()


def set_subreaper():
    import ctypes
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def python():
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def task_states(pid, light=False):
    """[(tid, state, wchan, kernel stack)] for every thread of pid (light: states only)."""
    out = []
    for t in sorted(glob.glob(f"/proc/{pid}/task/*")):
        try:
            with open(t + "/stat") as f:
                st = f.read()
            state = st[st.rindex(")") + 2]
        except (OSError, ValueError):
            continue
        wchan = stack = ""
        if light:
            out.append((int(os.path.basename(t)), state, "", ""))
            continue
        try:
            with open(t + "/wchan") as f:
                wchan = f.read()
        except OSError:
            pass
        try:
            with open(t + "/stack") as f:
                stack = f.read()
        except OSError:
            pass
        out.append((int(os.path.basename(t)), state, wchan, stack))
    return out


# --- the daemon ------------------------------------------------------------------
class Daemon:
    def __init__(self, out, gdb=False):
        self.out = out
        self.gdb = gdb
        self.n = 0
        self.proc = None
        self.pid = None
        self.log_pos = 0

    def start(self):
        self.n += 1
        self.mnt = os.path.join(self.out, f"mnt.{self.n}")
        os.makedirs(self.mnt, exist_ok=True)
        self.log = os.path.join(self.out, f"daemon.{self.n}.log")
        self.err = os.path.join(self.out, f"daemon.{self.n}.err")
        self.log_pos = 0
        cmd = [python(), "-X", "faulthandler", os.path.join(HERE, "daemon.py"), "mount",
               "--foreground", "--log", self.log, self.mnt]
        if self.gdb:
            cmd = ["gdb", "-q", "-batch", "-ex", "handle SIGUSR1 nostop noprint pass",
                   "-ex", "handle SIGUSR2 nostop noprint pass", "-ex", "handle SIGPIPE nostop noprint pass",
                   "-ex", "run", "-ex", "thread apply all bt", "--args"] + cmd
        errf = open(self.err, "wb")
        self.proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=errf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        errf.close()
        deadline = now() + (60 if self.gdb else 20)
        while now() < deadline:
            if os.path.exists(os.path.join(self.mnt, "kvm")):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon did not start:\n{self.stderr_text()}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"daemon did not mount within the time:\n{self.stderr_text()}")
        self.pid = None
        while self.pid is None and now() < deadline:
            m = re.search(r"mounted on .* \(pid (\d+)\)", self.log_text())
            if m:
                self.pid = int(m.group(1))
            else:
                time.sleep(0.05)
        if self.pid is None:
            self.pid = self.proc.pid

    def alive(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                st = f.read()
            return st[st.rindex(")") + 2] not in "ZX"
        except OSError:
            return False

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stderr_text(self):
        try:
            with open(self.err, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def new_log(self):
        text = self.log_text()
        new, self.log_pos = text[self.log_pos:], len(text)
        return new

    def answers(self, timeout=10):
        try:
            r = subprocess.run(["stat", "-c", "%i", os.path.join(self.mnt, "kvm")], timeout=timeout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return r.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def dump_stacks(self):
        """The daemon's Python stacks (faulthandler on SIGUSR2), appended to its stderr."""
        before = len(self.stderr_text())
        try:
            os.kill(self.pid, signal.SIGUSR2)
        except OSError:
            return ""
        time.sleep(0.5)
        return self.stderr_text()[before:]

    def sample(self):
        st = proc_status(self.pid)
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                maps = sum(1 for _ in f)
        except OSError:
            maps = 0
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = 0
        rss = int(st.get("VmRSS", "0 kB").split()[0]) if st else 0
        return {"rss_kb": rss, "maps": maps, "threads": int(st.get("Threads", 0) or 0), "fds": fds}

    def stop(self):
        if self.proc is None:
            return
        for tool in ("fusermount", "fusermount3"):
            if shutil.which(tool):
                subprocess.run([tool, "-uz", self.mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                break
        subprocess.run(["umount", "-l", self.mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def abort_connection(self):
        """Fail every request still waiting on this mount (a wedged daemon cannot):
        /sys/fs/fuse/connections/N/abort, N the minor of the mount's device (fusectl
        is mounted first when it is not).  Other mounts' connections are not touched."""
        ctl = "/sys/fs/fuse/connections"
        if os.path.isdir(ctl) and not os.listdir(ctl):
            subprocess.run(["mount", "-t", "fusectl", "none", ctl], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        try:
            r = subprocess.run(["stat", "-c", "%d", self.mnt], capture_output=True, text=True, timeout=5)
            dev = int(r.stdout)
        except (subprocess.TimeoutExpired, ValueError):
            return False
        try:
            with open(f"{ctl}/{os.minor(dev)}/abort", "w") as f:
                f.write("1")
            return True
        except OSError:
            return False


def log_records(text):
    """Split log text into records (a record starts with a timestamp)."""
    starts = [m.start() for m in RECORD.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]


def traceback_signature(rec):
    first = rec.splitlines()[0]
    m = re.search(r"(?:ERROR|CRITICAL) (\S+): (.*)", first)
    head = m.group(2) if m else first
    head = re.sub(r"0x[0-9a-f]+|\d+", "N", head)[:80]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', rec)
    last = ""
    if frames:
        f, line, fn = frames[-1]
        last = f"{os.path.basename(f)}:{line}:{fn}"
    exc = ""
    lines = [ln for ln in rec.strip().splitlines() if ln and not ln.startswith(" ")]
    if len(lines) > 1:
        exc = lines[-1].split(":")[0][:60]
    return f"traceback:{exc}@{last}|{head}" if frames else f"error:{head}"


# --- one round -------------------------------------------------------------------
class Fuzzer:
    def __init__(self, args):
        self.args = args
        self.out = args.out or tempfile.mkdtemp(prefix="kvmfs-fuzz.")
        os.makedirs(os.path.join(self.out, "rounds"), exist_ok=True)
        os.makedirs(os.path.join(self.out, "findings"), exist_ok=True)
        self.daemon = Daemon(self.out, gdb=args.gdb)
        self.findings = []             # every finding
        self.distinct = {}             # signature -> first finding
        self.samples = []
        self.popen_pids = set()
        self.stuck = []                # clients freed only by a daemon restart
        self.rounds = 0
        self.actions = 0

    def run_round(self, rnd, tag):
        """Run one round; returns the list of findings (dicts)."""
        path = os.path.join(self.out, "rounds", f"{tag}.json")
        with open(path, "w") as f:
            json.dump(rnd, f)
        events = path[:-5] + ".events"
        open(events, "w").close()
        d = self.daemon
        d.new_log()
        wout = open(path[:-5] + ".out", "wb")
        proc = subprocess.Popen([python(), os.path.join(HERE, "worker.py"), d.mnt, path, events],
                                env=env(), cwd=REPO, stdout=wout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        wout.close()
        self.popen_pids = {proc.pid}
        found = []
        inflight = {}                  # (pid, tid, id) -> (start, event)
        pids = {proc.pid}
        done_actions = 0
        pos = 0
        hang = None
        leaks = []
        deadline = now() + self.args.round_timeout
        while True:
            with open(events, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            pos += cut
            for line in chunk[:cut].splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                t = e.get("t")
                if t == "B":
                    inflight[(e["pid"], e["tid"], e["id"])] = (now(), e)
                elif t == "E":
                    inflight.pop((e["pid"], e["tid"], e["id"]), None)
                    done_actions += 1
                elif t == "P":
                    pids.add(e["pid"])
                elif t == "F":
                    leaks.append(e)
            self._reap()
            if proc.poll() is not None and not any(self._exists(p) for p in pids):
                break
            if not d.alive():
                break
            oldest = min(inflight.values(), key=lambda x: x[0], default=None)
            if oldest and now() - oldest[0] > self.args.hang:
                hang = oldest[1]
                break
            if now() > deadline:
                hang = {"id": "?", "op": "round", "a": "round timeout", "pid": proc.pid, "tid": proc.pid}
                break
            time.sleep(0.05)
        self.actions += done_actions
        trace_info = {"seed": rnd.get("seed"), "round": rnd.get("round"), "file": path}
        for e in leaks:
            found.append(dict(trace_info, kind="ior-leak",
                              signature="ior-leak:" + ("known" if int(e["cmd"], 16) in gen.abi.IOCTL_NAMES else "unknown") + "-ioctl",
                              detail=e))
        if hang is not None:
            states = {p: task_states(p) for p in sorted(pids) if self._exists(p)}
            client = [(p, tid, st, w, stack) for p, ts in states.items() for tid, st, w, stack in ts]
            dstate = [c for c in client if c[2] == "D"]
            stacks = d.dump_stacks() if d.alive() else ""
            op = hang.get("op")
            a = hang.get("a") or {}
            what = gen.abi.IOCTL_NAMES.get(a.get("cmd"), hex(a["cmd"])) if op == "ioctl" else op
            found.append(dict(trace_info, kind="hang", signature=f"hang:{what}:{'D' if dstate else 'S'}",
                              detail={"action": hang, "seconds": self.args.hang,
                                      "client_threads": [{"pid": p, "tid": tid, "state": st, "wchan": w,
                                                          "stack": stack} for p, tid, st, w, stack in client],
                                      "daemon_stacks": stacks[-20000:]}))
            self._kill(pids)
        if not d.alive():
            time.sleep(0.3)
            err = d.stderr_text()
            code = d.proc.poll()
            found.append(dict(trace_info, kind="crash", signature=crash_signature(err, code),
                              detail={"returncode": code, "stderr": err[-20000:],
                                      "inflight": [e for _, e in inflight.values()]}))
            self._kill(pids)
        elif not d.answers():
            found.append(dict(trace_info, kind="mount-dead", signature="mount-dead",
                              detail={"stacks": d.dump_stacks()[-20000:]}))
        for rec in log_records(d.new_log()):
            if BAD_LOG.search(rec):
                found.append(dict(trace_info, kind="traceback", signature=traceback_signature(rec),
                                  detail={"log": rec[-6000:]}))
        if self._exists(proc.pid):
            self._kill(pids)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A thread of the client is stuck in a request nobody answers; a daemon
            # restart ends it.  Noted in the round's hang, if there is one.
            for f in found:
                if f["kind"] == "hang":
                    f["detail"]["unkillable_client"] = True
            self.stuck.append(proc)
            if not any(f["kind"] in ("crash", "hang", "mount-dead") for f in found):
                found.append(dict(trace_info, kind="hang", signature="hang:unkillable-client",
                                  detail={"pids": sorted(pids)}))
        return found

    def _exists(self, pid):
        """pid has a thread that has not exited (a zombie leader whose other thread is
        stuck in the kernel still exists)."""
        return any(st not in "ZX" for _, st, _, _ in task_states(pid, light=True))

    def _reap(self):
        """Reap orphans handed to this subreaper; never the daemon or the worker (Popen's)."""
        mine = {x.pid for x in (self.daemon.proc,) if x is not None} | self.popen_pids
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in mine:
                return
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                return

    def _kill(self, pids):
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        deadline = now() + 5
        while now() < deadline and any(self._exists(p) for p in pids):
            self._reap()
            time.sleep(0.05)
        if any(self._exists(p) for p in pids):
            self.daemon.abort_connection()
            time.sleep(0.5)
            self._reap()

    # --- findings ----------------------------------------------------------------
    def restart_daemon(self):
        self.daemon.stop()
        for p in self.stuck:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.stuck = [p for p in self.stuck if p.poll() is None]
        self.daemon.start()

    def record(self, fs):
        restart = False
        for f in fs:
            self.findings.append(f)
            new = f["signature"] not in self.distinct
            if new:
                self.distinct[f["signature"]] = f
                name = f"{len(self.distinct):02d}-{f['kind']}"
                f["name"] = name
                with open(os.path.join(self.out, "findings", name + ".json"), "w") as fh:
                    with open(f["file"]) as rf:
                        rnd = json.load(rf)
                    json.dump(dict(rnd, finding={k: v for k, v in f.items() if k != "file"}), fh, indent=1)
                print(f"FINDING {f['kind']}: {f['signature']}  seed={f['seed']} round={f['round']}\n"
                      f"  replay: {sys.executable} tests/fuzz/fuzz.py --replay "
                      f"{os.path.join(self.out, 'findings', name + '.json')}", flush=True)
            if f["kind"] in ("crash", "hang", "mount-dead"):
                restart = True
        if restart:
            self.restart_daemon()

    def ior_sweep(self):
        """An unknown _IOR (size 4096, buffer pre-filled) on one fd of every kind: the
        ioctl must fail and the buffer stay as it was (no daemon heap copied out)."""
        kinds = [("kvm", ["kvm"]), ("syscmd", ["cmd"]), ("sysview", ["info", "vms"]),
                 ("vmctl", ["vm", ["k", 0], "ctl"]), ("vmcmd", ["vm", ["k", 0], "cmd"]),
                 ("mem", ["vm", ["k", 0], "mem"]), ("vmview", ["vm", ["k", 0], "info/memslots"]),
                 ("vcpu", ["vcpu", 0, ""]), ("vcpucmd", ["vcpu", 0, ".cmd"]), ("vcpurun", ["vcpu", 0, ".run"])]
        actions = [{"op": "setup_guest", "code": "f4", "vcpus": 1, "log_dirty": False, "smm_slot": False}]
        for kind, path in kinds:
            actions.append({"op": "open", "path": path, "flags": os.O_RDONLY if "view" in kind else os.O_RDWR})
            actions.append({"op": "ior_probe", "kind": kind, "fd": 0, "type": gen.abi.KVMIO, "nr": 0xFF})
        rnd = {"seed": "ior-sweep", "round": 0, "actions": actions}
        fs = self.run_round(rnd, "ior-sweep")
        events = os.path.join(self.out, "rounds", "ior-sweep.events")
        results = {}
        with open(events) as f:
            for line in f:
                e = json.loads(line)
                if e.get("t") == "F":
                    results[e["fdkind"]] = f"{e['errno']}, {e['changed']} of {e['size']} bytes changed " \
                                           f"(first: {e['sample'][:32]}...)"
                elif e.get("t") == "E" and e["id"].isdigit() and int(e["id"]) % 2 == 0 and int(e["id"]) > 0:
                    kind = kinds[int(e["id"]) // 2 - 1][0]
                    results.setdefault(kind, e["r"] + ", buffer untouched")
        print("== unknown _IOR(0xAE, 0xFF, 4096) on each fd kind:")
        for kind, _ in kinds:
            print(f"  {kind:8s} {results.get(kind, '?')}")
        for f in fs:
            if f["kind"] == "ior-leak":
                f["signature"] = "ior-leak:sweep:" + f["detail"]["fdkind"]
        self.record(fs)

    def fuzz(self):
        a = self.args
        self.ior_sweep()
        deadline = now() + a.seconds
        r = 0
        while now() < deadline:
            rng = random.Random(f"{a.seed}.{r}")
            rnd = {"seed": a.seed, "round": r, "actions": gen.gen_round(rng, a.actions)}
            fs = self.run_round(rnd, f"r{r}")
            self.rounds += 1
            self.record(fs)
            if self.daemon.alive():
                self.samples.append(dict(self.daemon.sample(), round=r, daemon=self.daemon.n))
            r += 1
            if not a.keep_rounds and not fs:
                for ext in (".json", ".events", ".out"):
                    try:
                        os.unlink(os.path.join(self.out, "rounds", f"r{r - 1}{ext}"))
                    except OSError:
                        pass

    # --- replay and minimizing ------------------------------------------------------
    def reproduces(self, actions, sig, tag):
        rnd = {"seed": "replay", "round": tag, "actions": actions}
        fs = self.run_round(rnd, tag)
        hit = any(f["signature"] == sig for f in fs)
        if any(f["kind"] in ("crash", "hang", "mount-dead") for f in fs):
            self.restart_daemon()
        return hit

    def minimize(self, f, budget):
        """ddmin over the round's top-level actions; the shortest list that still gives the signature."""
        with open(f["file"]) as fh:
            actions = json.load(fh)["actions"]
        sig = f["signature"]
        end = now() + budget
        if f["kind"] == "hang":
            top = str(f["detail"]["action"].get("id", "")).split(".")[0]
            if top.isdigit():
                actions = actions[:int(top) + 1]
        tries = 0
        ok = False
        for _ in range(3):
            tries += 1
            if self.reproduces(actions, sig, f"min{tries}"):
                ok = True
                break
        if not ok:
            return None, tries
        n = 2
        while len(actions) >= 2 and now() < end:
            size = -(-len(actions) // n)
            chunks = [actions[i:i + size] for i in range(0, len(actions), size)]
            reduced = False
            for i in range(len(chunks)):
                if now() >= end:
                    break
                cand = [x for j, c in enumerate(chunks) if j != i for x in c]
                tries += 1
                if cand and self.reproduces(cand, sig, f"min{tries}"):
                    actions, n, reduced = cand, max(n - 1, 2), True
                    break
            if not reduced:
                if n >= len(actions):
                    break
                n = min(2 * n, len(actions))
        return actions, tries

    def minimize_all(self, budget):
        end = now() + budget
        items = [f for f in self.distinct.values() if f.get("seed") != "ior-sweep"]
        for i, f in enumerate(items):
            left = end - now()
            if left <= 0:
                break
            share = left / (len(items) - i)
            actions, tries = self.minimize(f, share)
            path = os.path.join(self.out, "findings", f["name"] + ".min.json")
            if actions is None:
                f["minimal"] = None
                print(f"  {f['name']}: not reproduced on replay ({tries} tries): a race; "
                      "the full round is the trace", flush=True)
                continue
            with open(path, "w") as fh:
                json.dump({"seed": f["seed"], "round": f["round"], "actions": actions,
                           "finding": {"kind": f["kind"], "signature": f["signature"]}}, fh, indent=1)
            f["minimal"] = path
            print(f"  {f['name']}: {len(actions)} actions after {tries} replays -> {path}", flush=True)
            for line in trace_lines(actions):
                print("    " + line)

    # --- report ------------------------------------------------------------------
    def summary(self):
        counts = {k: 0 for k in SEVERE}
        for f in self.findings:
            counts[f["kind"]] = counts.get(f["kind"], 0) + 1
        growth = {}
        by_daemon = {}
        for smp in self.samples:
            by_daemon.setdefault(smp["daemon"], []).append(smp)
        if by_daemon:
            ss = max(by_daemon.values(), key=len)       # the daemon that lived longest
            first, last = ss[min(2, len(ss) - 1)], ss[-1]      # after warm-up
            for k in ("rss_kb", "maps", "threads", "fds"):
                growth[k] = {"first": first[k], "last": last[k], "max": max(s[k] for s in ss),
                             "growth": last[k] - first[k], "rounds": last["round"] - first["round"]}
        return {"rounds": self.rounds, "actions": self.actions, "counts": counts,
                "distinct": [{"kind": f["kind"], "signature": f["signature"], "seed": f["seed"],
                              "round": f["round"], "name": f.get("name"), "minimal": f.get("minimal")}
                             for f in self.distinct.values()],
                "daemon_growth": growth, "out": self.out, "daemon_restarts": self.daemon.n - 1}


def crash_signature(err, code):
    m = re.search(r"Fatal Python error: (\w+)", err)
    kind = m.group(1) if m else f"exit {code}"
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', err)
    top = ""
    cur = err.find("Current thread")
    if cur >= 0:
        fr = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', err[cur:])
        if fr:
            f, line, fn = fr[0]
            top = f"{os.path.basename(f)}:{line}:{fn}"
    elif frames:
        f, line, fn = frames[0]
        top = f"{os.path.basename(f)}:{line}:{fn}"
    return f"crash:{kind}@{top}"


def trace_lines(actions, depth=0):
    out = []
    for i, a in enumerate(actions):
        sub = a.get("actions")
        b = {k: v for k, v in a.items() if k != "actions"}
        if b.get("op") == "ioctl":
            b["cmd"] = gen.abi.IOCTL_NAMES.get(b["cmd"], hex(b["cmd"]))
        if b.get("op") == "write_cmd":
            b["text"] = bytes.fromhex(b.pop("hex")).decode(errors="replace")[:200]
        out.append("  " * depth + f"{i}: " + json.dumps(b))
        if sub:
            out += trace_lines(sub, depth + 1)
    return out


def print_summary(s, fz):
    print(f"\n== {s['rounds']} rounds, {s['actions']} actions, daemon restarts {s['daemon_restarts']}, "
          f"output in {s['out']}")
    print("== findings: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    for f in fz.distinct.values():
        print(f"  [{f['kind']}] {f['signature']}  (seed {f['seed']} round {f['round']}; "
              f"{f.get('name')})")
    if s["daemon_growth"]:
        print("== daemon over the rounds (first after warm-up -> last, max):")
        for k, g in s["daemon_growth"].items():
            print(f"  {k}: {g['first']} -> {g['last']} (max {g['max']}, {g['growth']:+d} over {g['rounds']} rounds)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="fuzzing time (default 60)")
    p.add_argument("--seed", default=None, help="base seed (default: random, printed)")
    p.add_argument("--actions", type=int, default=40, help="actions per round (default 40)")
    p.add_argument("--hang", type=float, default=15, help="an action taking longer is a hang (s)")
    p.add_argument("--round-timeout", type=float, default=180, help="a round taking longer is a hang (s)")
    p.add_argument("--out", help="output directory (default: a new /tmp/kvmfs-fuzz.*)")
    p.add_argument("--replay", help="run the rounds of a trace file (a findings/*.json or rounds/*.json)")
    p.add_argument("--minimize-seconds", type=float, default=120, help="time to shrink findings")
    p.add_argument("--no-minimize", action="store_true")
    p.add_argument("--keep-rounds", action="store_true", help="keep every round's trace, not only findings'")
    p.add_argument("--gdb", action="store_true", help="run the daemon under gdb (native stacks of a crash)")
    p.add_argument("--shrink", action="store_true",
                   help="with --replay of a findings file: shrink it to the shortest reproducing trace")
    p.add_argument("--repeat", type=int, default=1, help="with --replay: run the trace this many times")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = str(random.SystemRandom().randrange(1 << 32))
    set_subreaper()
    fz = Fuzzer(a)
    print(f"kvmfs fuzz: seed {a.seed}, output in {fz.out}", flush=True)
    fz.daemon.start()
    try:
        if a.replay:
            with open(a.replay) as f:
                rnd = json.load(f)
            finding = rnd.pop("finding", None)
            if a.shrink and finding:
                f = dict(finding, file=a.replay, name=os.path.basename(a.replay)[:-5],
                         seed=rnd.get("seed"), round=rnd.get("round"))
                f.setdefault("detail", {})
                fz.distinct[f["signature"]] = f
                fz.minimize_all(a.minimize_seconds)
                return 0
            for line in trace_lines(rnd["actions"]):
                print("  " + line)
            for i in range(a.repeat):
                fs = fz.run_round(rnd, f"replay{i}")
                fz.rounds += 1
                for f in fs:
                    print(f"REPLAY {f['kind']}: {f['signature']}")
                    det = f.get("detail", {})
                    for k in ("log", "stderr", "daemon_stacks"):
                        if det.get(k):
                            print(det[k][-6000:])
                    if f["kind"] == "hang":
                        for t in det.get("client_threads", []):
                            print(f"  client pid {t['pid']} tid {t['tid']} state {t['state']} wchan {t['wchan']}")
                            if t["stack"]:
                                print("   " + t["stack"].replace("\n", "\n   "))
                fz.record(fs)
        else:
            fz.fuzz()
            if fz.distinct and not a.no_minimize and a.minimize_seconds > 0:
                print("== shrinking the distinct findings", flush=True)
                fz.minimize_all(a.minimize_seconds)
    finally:
        if fz.daemon.alive():
            fz.samples.append(dict(fz.daemon.sample(), round=fz.rounds, daemon=fz.daemon.n))
        fz.daemon.stop()
    s = fz.summary()
    print_summary(s, fz)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 1 if any(s["counts"].get(k) for k in SEVERE) else 0


if __name__ == "__main__":
    sys.exit(main())
