#!/usr/bin/env python3
"""Idle cost: CPU and memory of the operator process while it manages N real
workspaces (default 50) and nothing changes, over a window (default 60 s).

Starts `molecule-operator up` on N generated Workspaces with its defaults
(heartbeat every 30 s, resync every 60 s), waits until every workspace is Running,
lets it settle, then reads /proc/<pid>/stat (utime + stime) at the start and the end
of the window and /proc/<pid>/status (VmRSS) every second. CPU% is of one core. The
window is at least one resync period long, so it always contains a full resync
(listing, token-file reads of every container), and N/30 heartbeats per second.

Usage: python3 bench/idle.py [--workspaces 50] [--seconds 60] [--quick]
"""
import argparse, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Operator, add_common_args, command_line, loadavg, online, require_bin, write_section  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)


def status_kib(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def threads(pid):
    return status_kib(pid, "Threads")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "idle")
    ap.add_argument("--workspaces", type=int, default=None, help="default 50; --quick: 10")
    ap.add_argument("--seconds", type=int, default=None, help="measurement window; default 60; --quick: 10")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after all are Running")
    a = ap.parse_args()
    require_bin(a.bin)
    n = a.workspaces or (10 if a.quick else 50)
    window = a.seconds or (10 if a.quick else 60)
    op = Operator(a.bin, ["w%03d" % i for i in range(n)], tag="idle")
    try:
        op.start()
        t0 = time.time()
        op.wait(lambda ws: len(ws) == n and all(online(w) for w in ws.values()), deadline=300, interval=0.25)
        converged = time.time() - t0
        time.sleep(a.settle)
        pid = op.proc.pid
        load_start = loadavg()
        c0, w0 = cpu_ticks(pid), time.time()
        rss = []
        samples = []  # per-second CPU to show where it goes
        last_c, last_t = c0, w0
        while time.time() - w0 < window:
            time.sleep(1)
            c, t = cpu_ticks(pid), time.time()
            rss.append(status_kib(pid, "VmRSS"))
            samples.append((c - last_c) / CLK_TCK / (t - last_t) * 100)
            last_c, last_t = c, t
        c1, w1 = cpu_ticks(pid), time.time()
        hwm = status_kib(pid, "VmHWM")
        nthreads = threads(pid)
        ws = op.workspaces() or {}
        still = sum(1 for w in ws.values() if online(w))
        cpu_s = (c1 - c0) / CLK_TCK
        cpu_pct = cpu_s / (w1 - w0) * 100
        res = {"workspaces": n, "window_s": round(w1 - w0, 1), "cpu_s": round(cpu_s, 3), "cpu_pct": round(cpu_pct, 3),
               "rss_mib_avg": round(sum(rss) / len(rss) / 1024, 1), "rss_mib_max": round(max(rss) / 1024, 1),
               "peak_rss_mib": round(hwm / 1024, 1), "threads": nthreads, "busiest_second_pct": round(max(samples), 1),
               "still_running": still, "converged_s": round(converged, 2), "load1_start": load_start, "load1_end": loadavg()}
        print(json.dumps(res), flush=True)
    finally:
        op.cleanup()
    out = ["## Idle cost (issue 7.6)", "",
           "The operator process managing %d real workspaces (agents heartbeating every 30 s, resync every 60 s: the "
           "defaults) with nothing changing, over %d s after all were Running and %g s of settling. CPU from "
           "`/proc/<pid>/stat` (utime + stime) over the window, in percent of one core; RSS from `/proc/<pid>/status`, "
           "sampled every second." % (n, window, a.settle), "",
           "```sh", command_line(), "```", "",
           "| workspaces | window (s) | CPU time (s) | CPU (% of a core) | busiest second (%) | RSS avg (MiB) | RSS max (MiB) | peak RSS since start (MiB) | threads |",
           "|---|---|---|---|---|---|---|---|---|",
           "| %d | %.1f | %.3f | %.2f | %.1f | %.1f | %.1f | %.1f | %d |" % (
               n, res["window_s"], res["cpu_s"], res["cpu_pct"], res["busiest_second_pct"], res["rss_mib_avg"],
               res["rss_mib_max"], res["peak_rss_mib"], res["threads"]), "",
           "Target: under 1%% CPU with 50 workspaces: %s. %d of %d workspaces were still Running at the end. "
           "Machine load (1-minute average): %s at the start of the window, %s at the end."
           % (("holds" if cpu_pct < 1 else "MISSED") if n == 50 else "not evaluated (measured with %d)" % n,
              still, n, res["load1_start"], res["load1_end"]), "",
           "The peak RSS since start includes the cold converge of the %d workspaces (%.1f s) before the window." % (n, converged)]
    if a.quick:
        out.insert(2, "_Quick smoke run: not the numbers to quote._\n")
    write_section(a.out, "\n".join(out))


if __name__ == "__main__":
    main()
