#!/usr/bin/env python3
"""Heal latency of a running operator, measured against the real Docker daemon.

For each case, damages one online workspace and times how long until its agent is
registered again on a NEW token (phase Running, a heartbeat newer than the damage,
and a token prefix different from the one that was damaged), over N trials:

  rm       container removed out of band (docker rm -f)
  rm-v     container and its config volume removed (the `docker compose down -v` incident)
  exit     the agent's process killed (docker kill -s KILL): the container exits on its own,
           as on an agent crash or an OOM kill
  token    token file inside the running container overwritten
  restart  container removed while the operator was stopped; timed from the operator's start

Usage: python3 bench/heal.py [--trials N] [--cases rm,rm-v,exit,token,restart] [--quick]
Prints a JSON line per case (p50/p99/max seconds) and writes its markdown section,
with the original platform's design beside it as a computed model (see benchlib.py
for --bin/--out). Builds nothing. Cleans up its containers.
"""
import argparse, io, json, os, subprocess, sys, tarfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Operator, add_common_args, command_line, docker, loadavg, online, pct, require_bin, ts,  # noqa: E402
                      finish_section)


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
        elif case == "exit":
            docker("kill", "-s", "KILL", cid)
        elif case == "token":
            overwrite_token(cid)
    op.wait(healed(name, t0, prefix))
    return time.time() - t0


LOST_RACES = [0]


# The original platform's design, as a model (computed, not measured): a sweeper pass
# every 60 s revokes a token that has no container once it is older than a 5-minute
# grace; the damage happens at a uniformly random moment of the sweep period; then a
# human restarts the workspace by hand. The human's reaction and the restart itself
# are not counted, so these are lower bounds.
SWEEP_S, GRACE_S = 60.0, 300.0
# Its health sweep (every 15 s) marks a workspace whose container is not running offline
# and restarts it.
HEALTH_SWEEP_S = 15.0
CASES = {
    "rm": "container removed (`docker rm -f`)",
    "rm-v": "container and config volume removed (`docker compose down -v`)",
    "exit": "container exited on its own (`docker kill -s KILL`: a crash or an OOM kill)",
    "token": "token file overwritten inside the running container",
    "restart": "container removed while the operator was stopped (timed from its start)",
}


def original_model(case, q):
    """Seconds to heal at quantile q under the original design; None: no automatic path."""
    if case == "token":
        return None  # the container exists, so the sweeper never touches its tokens
    if case == "exit":
        return HEALTH_SWEEP_S * q  # the health sweep's next pass notices, then a restart
    return GRACE_S + SWEEP_S * q


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "heal")
    ap.add_argument("--trials", type=int, default=None, help="per case; default 20, --quick: 3")
    ap.add_argument("--cases", default="rm,rm-v,exit,token,restart")
    ap.add_argument("--network", default=None,
                    help="the operator's --network (default: its own bridge network; `host` as before issue 16)")
    a = ap.parse_args()
    require_bin(a.bin)
    trials = a.trials or (3 if a.quick else 20)
    extra = ["--heartbeat-seconds", "1"] + (["--network", a.network] if a.network else [])
    op = Operator(a.bin, ["bench"], tier=1, tag="heal", extra_args=extra)
    results, races = {}, {}
    load_start = loadavg()
    try:
        op.start()
        for case in a.cases.split(","):
            xs, LOST_RACES[0] = [], 0
            while len(xs) < trials and LOST_RACES[0] < 10 * trials:
                x = trial(op, case, "bench")
                if x is not None:
                    xs.append(x)
            results[case], races[case] = xs, LOST_RACES[0]
            print(json.dumps({"case": case, "trials": len(xs), "p50_s": round(pct(xs, 50), 3),
                              "p99_s": round(pct(xs, 99), 3), "max_s": round(max(xs), 3),
                              "retried_lost_races": LOST_RACES[0]}), flush=True)
    finally:
        op.cleanup()
    out = ["## Heal latency (issues 3 and 7.2)", "",
           "Time from the damage to the workspace's agent registered again **on a new token** (phase Running, a "
           "heartbeat newer than the damage, a token prefix different from the damaged one), one workspace, "
           "`--heartbeat-seconds 1`, %d trials per case." % trials, "",
           "```sh", command_line(), "```", "",
           "| case | trials | p50 (s) | p99 (s) | max (s) | original design, modelled: p50 / p99 (s) | p50 faster by |",
           "|---|---|---|---|---|---|---|"]
    for case, xs in results.items():
        m50, m99 = original_model(case, 0.5), original_model(case, 0.99)
        model = ("≥ %.0f / ≥ %.0f" % (m50, m99)) if m50 is not None else "never by itself (no rule applies)"
        faster = ("≥ %.0fx" % (m50 / pct(xs, 50))) if m50 is not None else "-"
        out.append("| %s | %d | %.3f | %.3f | %.3f | %s | %s |" % (CASES.get(case, case), len(xs), pct(xs, 50),
                                                                  pct(xs, 99), max(xs), model, faster))
    lost = races.get("rm-v", 0)
    out += ["", "Targets: p50 under 1 s and p99 under 2 s for every case but the restart; under 3 s after a restart: %s."
            % ("all hold" if all(pct(results[c], 50) < 1 and pct(results[c], 99) < 2 for c in results if c != "restart")
               and ("restart" not in results or pct(results["restart"], 99) < 3) else "NOT all hold"), "",
            "The original platform's column is a **model, computed and not measured**: its sweeper ran every 60 s and "
            "revoked a token with no container once it was past a 5-minute grace; then someone had to restart the "
            "workspace by hand. With the damage at a uniformly random point of the sweep period, revocation comes "
            "300 + U(0, 60) s after the damage (p50 330 s, p99 359 s); the human's reaction and the restart are not "
            "counted, so the column is a lower bound. A container that exits is seen by its health sweep, every 15 s: "
            "U(0, 15) s (p50 7.5 s), again before the restart itself. A token file overwritten inside a running container has a "
            "container, so the sweeper never revokes its token: the agent is refused until someone revokes rows by hand.",
            "", "Notes:",
            "- In the `rm -v` case the operator often recreates the container between the two removals (it reacts to "
            "Docker's `destroy` event within milliseconds), so the volume is then in use and cannot be removed. Those "
            "trials (%d in this run) are retried and not counted; the counted ones really lost both. The test suite makes "
            "this case deterministic (`tests/local_mode.rs`, `heal_container_and_volume_removed_together`)." % lost,
            "- The token-file case is bounded by the agent: it re-reads the file every 0.5 s, presents the wrong token, "
            "gets a 401, and the 401 triggers the reconcile that writes a new token."]
    finish_section(a, out, load_start)


if __name__ == "__main__":
    main()
