#!/usr/bin/env python3
"""Warm pools (issue 19): claim to agent online, one at a time and in a burst.

Starts `molecule-operator up` with one WarmPool (default size 10), waits until it is
full, then:

1. one at a time (default 20 trials): writes a Workspace naming the pool, waits until
   its agent is online, notes the time from the file's write to the agent's first
   heartbeat as the registry recorded it (`lastHeartbeatAt`), waits for the pool to
   refill, and goes on. The same with no `warmPool` (a normal provision) for contrast.
2. a burst (default 50): a pool of that size, full; then every Workspace file at once;
   the time until all are online and the rate, and how many were served by a claim
   (the rest fell back to a normal provision, e.g. two claims raced for one member).

The agents heartbeat every 30 s (the default), so the first `lastHeartbeatAt` is the
register. Usage: python3 bench/pools.py [--trials 20] [--burst 50] [--size 10] [--quick]
"""
import argparse, json, os, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Operator, add_common_args, command_line, finish_section, loadavg, online, pct,  # noqa: E402
                      require_bin, ts)

TEMPLATE = "  runtime: langgraph\n  tier: 1\n"


def pool_yaml(size):
    return ("apiVersion: molecule.ai/v1alpha1\nkind: WarmPool\nmetadata:\n  name: bench\nspec:\n  size: %d\n"
            "  template:\n%s" % (size, TEMPLATE.replace("  ", "    ", 2)))


def ws_yaml(name, pooled):
    return ("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: %s\nspec:\n%s%s  env: {ROLE: %s}\n"
            % (name, TEMPLATE, "  warmPool: bench\n" if pooled else "", name))


def write(op, name, text):
    path = os.path.join(op.dir, name + ".yaml")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def pools(op):
    try:
        tok = open(os.path.join(op.state, "admin-token")).read().strip()  # written once the operator is up
        req = urllib.request.Request("http://127.0.0.1:%d/api/v1/warmpools" % op.port,
                                     headers={"Authorization": "Bearer " + tok})
        with urllib.request.urlopen(req, timeout=5) as r:
            return {p["name"]: p for p in json.load(r)}
    except Exception:
        return {}


def wait_pool(op, ready, deadline=300):
    t0 = time.time()
    while time.time() - t0 < deadline:
        p = pools(op).get("bench")
        if p and p.get("ready", 0) >= ready:
            return time.time() - t0
        time.sleep(0.05)
    raise RuntimeError("the pool did not reach %d ready; log: %s" % (ready, op.log_tail()))


def one(op, name, pooled):
    """Seconds from the write to the agent's register, and whether a member served it."""
    t0 = time.time()
    write(op, name, ws_yaml(name, pooled))
    ws = op.wait(lambda ws: name in ws and online(ws[name]), deadline=120, interval=0.005)
    return ts(ws[name]["lastHeartbeatAt"]) - t0


def claimed_count(op, names):
    members = set(op_docker_members(op))
    ws = op.workspaces() or {}
    return sum(1 for n in names if (ws.get(n, {}).get("container") or {}).get("id") in members)


def op_docker_members(op):
    from benchlib import docker
    return docker("ps", "-aq", "--no-trunc", "--filter", "label=ai.molecule.instance=" + op.instance,
                  "--filter", "label=ai.molecule.pool=default/bench", check=False).split()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "pools")
    ap.add_argument("--trials", type=int, default=None, help="one-at-a-time claims; default 20; --quick: 3")
    ap.add_argument("--burst", type=int, default=None, help="claims at once; default 50; --quick: 3")
    ap.add_argument("--size", type=int, default=None, help="pool size for the one-at-a-time part; default 10; --quick: 2")
    a = ap.parse_args()
    require_bin(a.bin)
    trials = a.trials or (3 if a.quick else 20)
    burst = a.burst or (3 if a.quick else 50)
    size = a.size or (2 if a.quick else 10)
    load_start = loadavg()
    res = {}

    op = Operator(a.bin, [], tag="pools")
    try:
        write(op, "pool", pool_yaml(size))
        op.start()
        res["fill_s"] = round(wait_pool(op, size), 2)
        claim, plain = [], []
        for i in range(trials):
            claim.append(one(op, "c%03d" % i, True))
            wait_pool(op, size)
            plain.append(one(op, "p%03d" % i, False))
        served = claimed_count(op, ["c%03d" % i for i in range(trials)])
        res["one"] = {"trials": trials, "served_by_pool": served,
                      "claim_p50": pct(claim, 50), "claim_p95": pct(claim, 95),
                      "provision_p50": pct(plain, 50), "provision_p95": pct(plain, 95)}
    finally:
        op.cleanup()

    op = Operator(a.bin, [], tag="poolb")
    try:
        write(op, "pool", pool_yaml(burst))
        op.start()
        wait_pool(op, burst, deadline=600)
        names = ["b%03d" % i for i in range(burst)]
        t0 = time.time()
        for n in names:
            write(op, n, ws_yaml(n, True))
        ws = op.wait(lambda ws: all(n in ws and online(ws[n]) for n in names), deadline=600, interval=0.02)
        last = max(ts(ws[n]["lastHeartbeatAt"]) for n in names) - t0
        each = sorted(ts(ws[n]["lastHeartbeatAt"]) - t0 for n in names)
        res["burst"] = {"n": burst, "all_online_s": round(last, 3), "rate_per_s": round(burst / last, 1),
                        "p50": each[len(each) // 2], "p95": pct(each, 95), "served_by_pool": claimed_count(op, names)}
    finally:
        op.cleanup()
    print(json.dumps(res), flush=True)

    o, b = res["one"], res["burst"]
    ms = lambda s: "%.0f" % (s * 1000)  # noqa: E731
    out = ["## Warm pools: claim to agent online (issue 19)", "",
           "A WarmPool of %d (template: runtime langgraph, tier 1) filled in %.1f s. One at a time, %d times: a "
           "Workspace naming the pool is written, and the time to its agent's register as the registry recorded it "
           "(`lastHeartbeatAt`) is taken; the pool refills before the next. The same spec without `warmPool` (a "
           "normal provision) for contrast. Then a burst: a full pool of %d and as many Workspace files at once."
           % (size, res["fill_s"], trials, burst), "",
           "```sh", command_line(), "```", "",
           "| path | n | served by a member | p50 (ms) | p95 (ms) |", "|---|---|---|---|---|",
           "| claim from the pool | %d | %d | %s | %s |" % (trials, o["served_by_pool"], ms(o["claim_p50"]), ms(o["claim_p95"])),
           "| normal provision | %d | - | %s | %s |" % (trials, ms(o["provision_p50"]), ms(o["provision_p95"])), "",
           "| burst | served by a member | all online (s) | rate (workspaces/s) | p50 (ms) | p95 (ms) |",
           "|---|---|---|---|---|---|",
           "| %d | %d | %.2f | %.1f | %s | %s |" % (b["n"], b["served_by_pool"], b["all_online_s"], b["rate_per_s"],
                                                 ms(b["p50"]), ms(b["p95"])), "",
           "Target (issue 19): claim to agent online p95 < 100 ms. The times include the directory source noticing the "
           "file (inotify) and the reconcile; a claim creates no container."]
    finish_section(a, out, load_start)


if __name__ == "__main__":
    main()
