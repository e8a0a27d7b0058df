#!/usr/bin/env python3
"""Cold converge: N workspaces from an empty Docker host to "every agent registered",
molecule-operator side by side with the tools a user would otherwise reach for.

Contenders, all with the same FROM scratch agent image (molecule-agent:local, by id)
and the same container config as the operator renders for a default (tier 2)
workspace: user 65534, init, 512 MiB / 1 CPU, host network, cap-drop ALL,
no-new-privileges, restart unless-stopped, a named volume at /configs, the same env:

  operator      `molecule-operator up DIR` on a directory of N Workspace YAMLs, timed
                from the process start (so its start-up, database and image check count)
  docker-seq    `docker run -d` of the N containers, one after another
  docker-par8   the same, 8 at a time: the floor for creating containers with Docker here
  compose       `docker-compose up -d` of the equivalent compose file (file format 2.4,
                network_mode: host, init: true; compose runs its own parallel creation)

"Converged" is the same event for all of them: the last of the N agents has registered
(HTTP 200 on POST /registry/register). The operator's agents register at the operator
with the token it wrote into their volume; the peers' agents have no token, so they
register at a stub registry this script serves on loopback, which accepts anyone and
records when each agent first registered. Registration implies the container is
running and the agent process is up. For the operator the script also reports when
its API first shows every workspace `phase: Running` (polled, so up to one poll
interval late), which is its own statement that it has seen the agents online.

podman kube play cannot be measured here: `podman run` fails in this sandbox
(`error setting rlimit ... operation not permitted`).

Usage: python3 bench/converge.py [--sizes 10,50,200] [--trials 3] [--quick]
Writes its markdown section (see benchlib.py) and prints a JSON line per run.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Operator, add_common_args, command_line, docker, free_port, loadavg, remove_instance,  # noqa: E402
                      require_bin, ts, write_section)

IMAGE = "molecule-agent:local"
HEARTBEAT_SECONDS = 30  # the operator's default; the agents register once within a converge
MEMORY = "512m"  # tier 2, the default tier
CPUS = "1"


class StubRegistry:
    """Accepts every register/heartbeat and records each workspace's first register."""

    def __init__(self):
        self.first = {}
        self.lock = threading.Lock()
        self.expect = 0
        self.all_in = threading.Event()
        stub = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                t = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    wid = json.loads(body)["workspace_id"]
                except Exception:
                    wid = None
                if wid and self.path.endswith("/register"):
                    with stub.lock:
                        stub.first.setdefault(wid, t)
                        if stub.expect and len(stub.first) >= stub.expect:
                            stub.all_in.set()
                out = b'{"status":"ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self, expect):
        with self.lock:
            self.first, self.expect = {}, expect
            self.all_in.clear()

    def close(self):
        self.server.shutdown(); self.server.server_close()


class Peers:
    """The raw docker and docker-compose contenders for one run id."""

    def __init__(self, image_id, registry_url, run_id):
        self.image = image_id
        self.registry_url = registry_url
        self.run = run_id
        self.label = "ai.molecule.bench-converge=" + run_id
        self.timeout = 120

    def names(self, n):
        return ["%s-%d" % (self.run, i) for i in range(n)]

    def env(self, name):
        return {"MOLECULE_WORKSPACE_ID": name, "WORKSPACE_ID": name, "MOLECULE_WORKSPACE_NAME": "default/" + name,
                "MOLECULE_REGISTRY_URL": self.registry_url, "PLATFORM_URL": self.registry_url,
                "MOLECULE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS), "WORKSPACE_CONFIG_PATH": "/configs",
                "TIER": "2", "ROLE": "bench"}

    def run_args(self, name):
        args = ["run", "-d", "--name", name, "--label", self.label, "--init", "--user", "65534:65534",
                "--network", "host", "--memory", MEMORY, "--cpus", CPUS, "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges:true", "--restart", "unless-stopped",
                "--mount", "type=volume,src=%s-configs,dst=/configs" % name]
        for k, v in sorted(self.env(name).items()):
            args += ["-e", "%s=%s" % (k, v)]
        return args + [self.image]

    def docker_run(self, n, parallel):
        names = self.names(n)
        if parallel <= 1:
            for name in names:
                docker(*self.run_args(name))
        else:
            with ThreadPoolExecutor(parallel) as pool:
                list(pool.map(lambda name: docker(*self.run_args(name)), names))

    def compose_file(self, n):
        lines = ['version: "2.4"', "services:"]
        for name in self.names(n):
            lines += ["  %s:" % name, "    image: %s" % self.image, "    container_name: %s" % name,
                      "    init: true", "    user: \"65534:65534\"", "    network_mode: host",
                      "    mem_limit: %s" % MEMORY, "    cpus: %s" % CPUS, "    cap_drop: [ALL]",
                      "    security_opt: [\"no-new-privileges:true\"]", "    restart: unless-stopped",
                      "    labels: {%s: \"%s\"}" % tuple(self.label.split("=")),
                      "    volumes: [\"%s-configs:/configs\"]" % name, "    environment:"]
            lines += ["      %s: \"%s\"" % kv for kv in sorted(self.env(name).items())]
        lines.append("volumes:")
        for name in self.names(n):
            lines.append("  %s-configs: {}" % name)
        return "\n".join(lines) + "\n"

    def compose(self, n, workdir):
        path = os.path.join(workdir, "docker-compose.yml")
        with open(path, "w") as f:
            f.write(self.compose_file(n))
        try:
            r = subprocess.run(["docker-compose", "-p", self.run, "-f", path, "up", "-d"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            started = len(docker("ps", "-q", "--filter", "label=" + self.label, check=False).split())
            raise RuntimeError("`docker-compose up -d` had not returned after %d s (%d of %d containers running)"
                               % (self.timeout, started, n))
        if r.returncode != 0:
            raise RuntimeError("docker-compose up failed: " + r.stdout.decode()[-1500:])

    def cleanup(self, workdir=None):
        path = workdir and os.path.join(workdir, "docker-compose.yml")
        if path and os.path.exists(path):
            subprocess.run(["docker-compose", "-p", self.run, "-f", path, "down", "-v", "-t", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ids = docker("ps", "-aq", "--filter", "label=" + self.label, check=False).split()
        for i in range(0, len(ids), 50):
            docker("rm", "-f", "-v", *ids[i:i + 50], check=False)
        vols = docker("volume", "ls", "-q", "--filter", "name=" + self.run, check=False).split()
        vols = [v for v in vols if v.startswith(self.run) or v.startswith(self.run.replace("-", "") + "_")]
        vols += docker("volume", "ls", "-q", "--filter", "label=com.docker.compose.project=" + self.run, check=False).split()
        vols = sorted(set(vols))
        for i in range(0, len(vols), 50):
            docker("volume", "rm", "-f", *vols[i:i + 50], check=False)


def run_peer(kind, n, peers, stub, timeout):
    workdir = tempfile.mkdtemp(prefix="bench-compose-")
    stub.reset(n)
    try:
        t0 = time.time()
        if kind == "docker-seq":
            peers.docker_run(n, 1)
        elif kind == "docker-par8":
            peers.docker_run(n, 8)
        elif kind == "compose":
            peers.compose(n, workdir)
        t_cmd = time.time() - t0
        if not stub.all_in.wait(timeout):
            raise RuntimeError("%s: only %d of %d agents registered in %ds" % (kind, len(stub.first), n, timeout))
        with stub.lock:
            t_reg = max(stub.first.values()) - t0
        return {"converged_s": t_reg, "command_s": t_cmd}
    finally:
        peers.cleanup(workdir)
        subprocess.run(["rm", "-rf", workdir])


def run_operator(n, binary, timeout, poll):
    # The host network, as the peers run: like for like. The operator's default (its own
    # bridge network, src/runtime/network.rs) costs the daemon about 0.1 s more per
    # container start on this machine (a network namespace, a veth pair, embedded DNS).
    op = Operator(binary, ["w%03d" % i for i in range(n)], tag="cvg",
                  extra_args=["--heartbeat-seconds", str(HEARTBEAT_SECONDS), "--network", "host"])
    try:
        op.start()
        t0 = op.started_at
        first_hb = {}
        t_running = None
        deadline = t0 + timeout
        while time.time() < deadline:
            if op.proc.poll() is not None:
                raise RuntimeError("operator exited: " + op.log_tail())
            ws = op.workspaces()
            now = time.time()
            if ws:
                for name, w in ws.items():
                    if w.get("lastHeartbeatAt") and name not in first_hb:
                        first_hb[name] = ts(w["lastHeartbeatAt"])
                if len(ws) == n and all(w.get("phase") == "Running" for w in ws.values()):
                    t_running = now - t0
                    break
            time.sleep(poll)
        if t_running is None:
            raise RuntimeError("operator: not converged in %ds; log: %s" % (timeout, op.log_tail()))
        # Workspaces that went Running between two polls: their first heartbeat is the one shown now.
        for name, w in ws.items():
            first_hb.setdefault(name, ts(w["lastHeartbeatAt"]))
        return {"converged_s": max(first_hb.values()) - t0, "running_s": t_running}
    finally:
        op.cleanup()


def ensure_image(binary):
    # `up` builds the image when it is missing or stale; a present image is left alone
    # (other operators on this daemon use it too). Peers use it by id.
    if not docker("image", "ls", "-q", IMAGE, check=False):
        r = subprocess.run([binary, "agent-image"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            sys.exit("could not build the agent image: " + r.stdout.decode()[-500:])
    return docker("image", "inspect", "-f", "{{.Id}}", IMAGE)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "converge")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 10,50,200; --quick: 5)")
    ap.add_argument("--trials", type=int, default=None, help="runs per contender and N; the median is reported (default 3; --quick: 1)")
    ap.add_argument("--contenders", default="docker-seq,docker-par8,compose,operator")
    ap.add_argument("--timeout", type=int, default=120, help="per run: a contender not converged by then is reported as such and not tried again at that N")
    a = ap.parse_args()
    require_bin(a.bin)
    sizes = [int(s) for s in (a.sizes or ("5" if a.quick else "10,50,200")).split(",")]
    trials = a.trials or (1 if a.quick else 3)
    contenders = a.contenders.split(",")
    image_id = ensure_image(a.bin)
    stub = StubRegistry()
    run_id = "cvg%d" % os.getpid()
    peers = Peers(image_id, "http://127.0.0.1:%d" % stub.port, run_id)
    peers.timeout = a.timeout
    failed = {}  # (kind, n) -> why; a contender that failed at N is not tried again at N
    results = {}  # (kind, n) -> [run dicts]
    loads = []
    try:
        for n in sizes:
            for t in range(trials):
                order = contenders[t % len(contenders):] + contenders[:t % len(contenders)]  # rotate: no fixed position bias
                for kind in order:
                    if (kind, n) in failed:
                        continue
                    loads.append(float(loadavg()) if loadavg() != "?" else 0.0)
                    poll = 0.1 if n <= 50 else 0.2
                    try:
                        if kind == "operator":
                            r = run_operator(n, a.bin, a.timeout, poll)
                        else:
                            r = run_peer(kind, n, peers, stub, a.timeout)
                    except RuntimeError as e:
                        failed[(kind, n)] = "trial %d: %s" % (t + 1, str(e).splitlines()[0][:300])
                        print(json.dumps({"contender": kind, "n": n, "trial": t + 1, "failed": failed[(kind, n)]}), flush=True)
                        continue
                    r.update(contender=kind, n=n, trial=t + 1, load1=loadavg())
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
                    results.setdefault((kind, n), []).append(r)
                    time.sleep(1)  # let the daemon finish the removals' background work
    finally:
        peers.cleanup()
        stub.close()

    def med(kind, n, key="converged_s"):
        xs = [r[key] for r in results.get((kind, n), []) if key in r]
        return statistics.median(xs) if xs else None

    label = {"operator": "molecule-operator `up`", "docker-seq": "`docker run -d`, sequential",
             "docker-par8": "`docker run -d`, 8 in parallel (floor)", "compose": "`docker-compose up -d`"}
    out = ["## Cold converge (issue 7.1)", "",
           "N workspaces from an empty Docker host until the last agent has registered; median of %d run%s per cell, "
           "contenders in rotating order. Same agent image (FROM scratch, by id) and the same container config as the "
           "operator renders for a default tier-2 workspace (user 65534, init, 512 MiB / 1 CPU, host network, cap-drop "
           "ALL, no-new-privileges, restart unless-stopped, a named volume at /configs, the same env)."
           % (trials, "" if trials == 1 else "s"), "",
           "```sh", command_line(), "```", "",
           "| N | contender | converged (s) | ratio to the floor | command returned (s) | operator: all `Running` in its API (s) |",
           "|---|---|---|---|---|---|"]
    for n in sizes:
        floor = med("docker-par8", n)
        for kind in contenders:
            c = med(kind, n)
            if (kind, n) in failed:
                out.append("| %d | %s | **did not converge**: %s | - | - | - |" % (n, label.get(kind, kind), failed[(kind, n)]))
                continue
            if c is None:
                continue
            ratio = "%.2fx" % (c / floor) if floor else "-"
            cmd = med(kind, n, "command_s")
            run = med(kind, n, "running_s")
            out.append("| %d | %s | %.2f | %s | %s | %s |" % (n, label.get(kind, kind), c, ratio,
                                                           "%.2f" % cmd if cmd is not None else "-",
                                                           "%.2f" % run if run is not None else "-"))
    out += ["", "What \"converged\" means, for every contender: the last of the N agents has answered 200 on "
            "`POST /registry/register`, which needs its container created, started, and the agent process up and "
            "speaking HTTP. The operator's agents register at the operator itself, with the token it wrote into each "
            "volume before start, and the time is the registry's own record (`lastHeartbeatAt` of the first register). "
            "The peers' agents have no token; they register at a stub registry the script serves on loopback, which "
            "accepts anyone and records the arrival time. The operator's time starts at the process start of `up`: its "
            "start-up, state database, image check, volume creation, token issue and token write all count. The last "
            "column is when the operator's own API first showed all N `Running` (polled every %s s)."
            % ("0.1/0.2" if any(n > 50 for n in sizes) else "0.1"), "",
            "\"command returned\" is when `docker run` (the last of them) or `docker-compose up -d` exited; the peers' agents "
            "register shortly after. The floor is the parallel `docker run`: the operator talks to the Docker API "
            "directly and pays no CLI start-up per container, so it can come in under it.", "",
            "podman kube play could not be measured: podman 4.3.1 installs here, but `podman run` fails in this sandbox "
            "(`error setting rlimit ... operation not permitted`), so no podman contender runs.", "",
            "Machine load (1-minute load average) at the start of each run: min %.2f, max %.2f."
            % (min(loads), max(loads)) if loads else ""]
    if a.quick:
        out.insert(2, "_Quick smoke run: not the numbers to quote._\n")
    write_section(a.out, "\n".join(out))


if __name__ == "__main__":
    main()
