#!/usr/bin/env python3
"""Heal latency of a running operator, measured against the real Docker daemon.

For each case, damages one online workspace and times how long until its agent is
registered again on a NEW token (phase Running, a heartbeat newer than the damage,
and a token prefix different from the one that was damaged), over N trials:

  rm       container removed out of band (docker rm -f)
  rm-v     container and its config volume removed (the `docker compose down -v` incident)
  token    token file inside the running container overwritten
  restart  container removed while the operator was stopped; timed from the operator's start

Usage: python3 bench/heal.py [--trials N] [--cases rm,rm-v,token,restart] [--bin PATH]
Prints a table and a JSON line per case (p50/p99/max seconds). Builds nothing:
run `cargo build --release` first (or pass --bin). Cleans up its containers.
"""
import argparse, io, json, os, shutil, signal, socket, statistics, subprocess, sys, tarfile, tempfile, time, urllib.request
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def docker(*a, check=True, inp=None):
    for _ in range(3):  # fuse-overlayfs sometimes fails a removal once ("directory not empty")
        r = subprocess.run(["docker", *a], input=inp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode == 0 or b"directory not empty" not in r.stderr:
            break
    if check and r.returncode != 0:
        raise RuntimeError("docker %s: %s" % (" ".join(a), r.stderr.decode()[-300:]))
    return r.stdout.decode().strip()


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class Op:
    def __init__(self, binary, names):
        self.bin = binary
        self.dir = tempfile.mkdtemp(prefix="bench-org-")
        self.state = tempfile.mkdtemp(prefix="bench-state-")
        self.port = free_port()
        self.instance = "bench%d" % os.getpid()
        self.proc = None
        for n in names:
            with open(os.path.join(self.dir, n + ".yaml"), "w") as f:
                f.write("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: %s\nspec:\n  tier: 1\n" % n)

    def start(self):
        log = open(os.path.join(self.state, "operator.log"), "ab")
        self.proc = subprocess.Popen([self.bin, "up", self.dir, "--state", self.state, "--listen", "127.0.0.1:%d" % self.port,
                                      "--instance", self.instance, "--heartbeat-seconds", "1"], stdout=log, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM); self.proc.wait(30); self.proc = None

    def workspaces(self):
        try:
            tok = open(os.path.join(self.state, "admin-token")).read().strip()
            req = urllib.request.Request("http://127.0.0.1:%d/api/v1/workspaces" % self.port, headers={"Authorization": "Bearer " + tok})
            with urllib.request.urlopen(req, timeout=2) as r:
                return {w["name"]: w for w in json.load(r)}
        except Exception:
            return None

    def wait(self, pred, deadline=60):
        t0 = time.time()
        while time.time() - t0 < deadline:
            ws = self.workspaces()
            if ws is not None and pred(ws):
                return ws
            time.sleep(0.01)
        raise RuntimeError("timed out; log: " + open(os.path.join(self.state, "operator.log")).read()[-2000:])

    def cleanup(self):
        if self.proc:
            self.proc.kill(); self.proc.wait()
        ids = docker("ps", "-aq", "--filter", "label=ai.molecule.instance=" + self.instance, check=False).split()
        names = docker("inspect", "-f", "{{.Name}}", *ids, check=False).split() if ids else []
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
        for n in names:  # volumes Docker re-created without labels in a removal race
            docker("volume", "rm", "-f", n.lstrip("/") + "-configs", check=False)
        vols = docker("volume", "ls", "-q", "--filter", "label=ai.molecule.instance=" + self.instance, check=False).split()
        if vols:
            docker("volume", "rm", "-f", *vols, check=False)
        shutil.rmtree(self.dir, ignore_errors=True); shutil.rmtree(self.state, ignore_errors=True)


def online(w):
    return w.get("phase") == "Running" and w.get("container") and w.get("lastHeartbeatAt")


def healed(name, t_damage, old_prefix):
    def pred(ws):
        w = ws.get(name)
        return (w and online(w) and ts(w["lastHeartbeatAt"]) >= t_damage
                and (w.get("token") or {}).get("prefix") not in (None, old_prefix))
    return pred


def overwrite_token(cid):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = b"garbage-garbage-garbage-garbage-garbage-xyz"
        info = tarfile.TarInfo(".auth_token"); info.size = len(data); info.mode = 0o600; info.uid = info.gid = 65534
        t.addfile(info, io.BytesIO(data))
    docker("cp", "-", cid + ":/configs", inp=buf.getvalue())


def trial(op, case, name):
    ws = op.wait(lambda ws: name in ws and online(ws[name]))
    w = ws[name]
    cid, prefix = w["container"]["id"], w["token"]["prefix"]
    if case == "restart":
        op.stop()
        docker("rm", "-f", cid)
        t0 = time.time()
        op.start()
    else:
        t0 = time.time()
        if case == "rm":
            docker("rm", "-f", cid)
        elif case == "rm-v":
            # Both removals back to back, as `docker compose down -v` does. The operator
            # may recreate the container between them (then the volume is in use and
            # this trial is the plain `rm` case): such trials are retried and counted.
            docker("rm", "-f", "-v", cid)
            if subprocess.run(["docker", "volume", "rm", w["container"]["name"] + "-configs"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                LOST_RACES[0] += 1
                op.wait(healed(name, t0, prefix))
                return None
        elif case == "token":
            overwrite_token(cid)
    op.wait(healed(name, t0, prefix))
    return time.time() - t0


LOST_RACES = [0]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--cases", default="rm,rm-v,token,restart")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "molecule-operator"))
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit("no operator binary at %s: run `cargo build --release` first" % a.bin)
    op = Op(a.bin, ["bench"])
    results = {}
    try:
        op.start()
        for case in a.cases.split(","):
            xs, LOST_RACES[0] = [], 0
            while len(xs) < a.trials and LOST_RACES[0] < 10 * a.trials:
                x = trial(op, case, "bench")
                if x is not None:
                    xs.append(x)
            results[case] = xs
            print(json.dumps({"case": case, "trials": len(xs), "p50_s": round(pct(xs, 50), 3),
                              "p99_s": round(pct(xs, 99), 3), "max_s": round(max(xs), 3),
                              "retried_lost_races": LOST_RACES[0]}), flush=True)
    finally:
        op.cleanup()
    print("\n| case | trials | p50 (s) | p99 (s) | max (s) |\n|---|---|---|---|---|")
    for case, xs in results.items():
        print("| %s | %d | %.3f | %.3f | %.3f |" % (case, len(xs), pct(xs, 50), pct(xs, 99), max(xs)))


if __name__ == "__main__":
    main()
