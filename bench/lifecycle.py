#!/usr/bin/env python3
"""Wake latency of the lifecycle autopilot (issue 19), against the real Docker daemon.

Two workspaces with `lifecycle.idleAfter: 2s` (`--heartbeat-seconds 1`), one
suspended to Paused (frozen, memory kept) and one to Stopped (no container, volume
kept). Each trial waits until the workspace is Suspended, then times
`POST /api/v1/workspaces/default/NAME/wake?wait=true` from the request to its answer:
the operator answers 200 once the registry has accepted the agent's first call after
the wake (its first heartbeat after a thaw; its register, on a new token, after a
Stopped suspension). That is "wake -> agent online" as a gateway waiting on the call
sees it.

Usage: python3 bench/lifecycle.py [--trials N] [--cases paused,stopped] [--quick]
Prints a JSON line per case (p50/p95/max seconds) and writes its markdown section
(see benchlib.py for --bin/--out). Builds nothing. Cleans up its containers.
"""
import argparse, json, os, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Operator, add_common_args, command_line, finish_section, loadavg, online, pct,  # noqa: E402
                      require_bin)

CASES = {"paused": "Paused", "stopped": "Stopped"}
TARGETS = {"paused": 0.5, "stopped": 1.5}  # p95 targets of issue 19 (seconds)


def manifest(name, suspend_to):
    return ("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: %s\nspec:\n"
            "  env: {ROLE: bench}\n  lifecycle: {idleAfter: 2s, suspendTo: %s}\n" % (name, suspend_to))


def wake(op, name):
    tok = open(os.path.join(op.state, "admin-token")).read().strip()
    req = urllib.request.Request("http://127.0.0.1:%d/api/v1/workspaces/default/%s/wake?wait=true&timeout=60"
                                 % (op.port, name), method="POST", headers={"Authorization": "Bearer " + tok})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=70) as r:
        body = json.load(r)
        if r.status != 200:
            raise RuntimeError("wake answered %d: %s" % (r.status, body))
    return time.time() - t0


def trial(op, name):
    op.wait(lambda ws: ws.get(name, {}).get("phase") == "Suspended", deadline=120, interval=0.05)
    took = wake(op, name)
    op.wait(lambda ws: name in ws and online(ws[name]), deadline=60, interval=0.05)
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "lifecycle")
    ap.add_argument("--trials", type=int, default=None, help="trials per case (default 30; 3 with --quick)")
    ap.add_argument("--cases", default="paused,stopped")
    a = ap.parse_args()
    require_bin(a.bin)
    trials = a.trials or (3 if a.quick else 30)
    cases = [c for c in a.cases.split(",") if c]
    op = Operator(a.bin, [], tag="life", extra_args=["--heartbeat-seconds", "1"])
    for case in cases:
        with open(os.path.join(op.dir, case + ".yaml"), "w") as f:
            f.write(manifest(case, CASES[case]))
    results = {}
    load_start = loadavg()
    try:
        op.start()
        op.wait(lambda ws: all(c in ws and online(ws[c]) for c in cases), deadline=120)
        for case in cases:
            xs = [trial(op, case) for _ in range(trials)]
            results[case] = xs
            print(json.dumps({"case": case, "trials": len(xs), "p50_s": round(pct(xs, 50), 3),
                              "p95_s": round(pct(xs, 95), 3), "max_s": round(max(xs), 3)}), flush=True)
    finally:
        op.cleanup()
    out = ["## Wake latency (issue 19)", "",
           "Time from `POST .../wake?wait=true` to its 200 answer (the agent's first accepted call after the wake), "
           "one workspace per case, `lifecycle.idleAfter: 2s`, `--heartbeat-seconds 1`, %d trials per case." % trials, "",
           "```sh", command_line(), "```", "",
           "| suspended to | trials | p50 (s) | p95 (s) | max (s) | target p95 (s) |",
           "|---|---|---|---|---|---|"]
    for case, xs in results.items():
        out.append("| %s | %d | %.3f | %.3f | %.3f | < %.1f %s |" % (
            CASES[case], len(xs), pct(xs, 50), pct(xs, 95), max(xs), TARGETS[case],
            "(holds)" if pct(xs, 95) < TARGETS[case] else "(NOT met)"))
    out += ["", "Notes:",
            "- Paused: the container is thawed (`docker unpause`, after `/configs/.thawed` is written); the agent "
            "heartbeats at once on the file's change, on its old token (`onPause: Keep`).",
            "- Stopped: a new incarnation is provisioned (container create and start, a new token written before the "
            "start), and the new agent registers."]
    finish_section(a, out, load_start)


if __name__ == "__main__":
    main()
