"""Shared helpers of the bench scripts (python3, stdlib only).

The contract every `bench/<name>` script follows, so that `bench/run` can assemble
BENCHMARKS.md from them:

- it accepts `--quick` (a smoke run: small sizes, few trials, seconds not minutes);
- it finds the operator binary in `--bin`, else `$MOLECULE_BIN`, else the release
  build under `$CARGO_TARGET_DIR` (or ./target);
- it writes its markdown section (a `## ` heading, the command that produced the
  numbers, the table, notes) to `--out`, else `$BENCH_RESULTS/<name>.md`, else
  `bench/results/<name>.md`;
- it removes every container, volume and process it started, also on failure, and
  only ever touches what carries its own labels or names.
"""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from datetime import datetime

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


def default_bin():
    if os.environ.get("MOLECULE_BIN"):
        return os.environ["MOLECULE_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release", "molecule-operator")


def default_out(name):
    return os.path.join(os.environ.get("BENCH_RESULTS") or os.path.join(BENCH, "results"), name + ".md")


def add_common_args(ap, name):
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few trials")
    ap.add_argument("--bin", default=default_bin(), help="the molecule-operator binary (release build)")
    ap.add_argument("--out", default=default_out(name), help="where the markdown section is written")


def require_bin(path):
    if not os.path.exists(path):
        sys.exit("no operator binary at %s: run `cargo build --release` first (or pass --bin / set MOLECULE_BIN)" % path)


def write_section(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text.rstrip() + "\n")
    os.replace(tmp, path)
    print("wrote %s" % path, flush=True)


def finish_section(a, out, load_start):
    """Appends the load note, marks a quick run, and writes the section to `a.out`."""
    out.append("- Machine load (1-minute average) at the start: %s; at the end: %s." % (load_start, loadavg()))
    if a.quick:
        out.insert(2, "_Quick smoke run: not the numbers to quote._\n")
    write_section(a.out, "\n".join(out))


def command_line():
    """The command that produced a section, as a user would type it from the repo root."""
    args = [a for a in sys.argv[1:]]
    skip = {"--out", "--bin"}
    out, i = [], 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        if any(args[i].startswith(s + "=") for s in skip):
            i += 1
            continue
        out.append(args[i]); i += 1
    return " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + out)


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


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def loadavg():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def workspace_yaml(name, tier=None, extra=""):
    spec = ("  tier: %d\n" % tier) if tier else "  env: {ROLE: bench}\n"
    return "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata:\n  name: %s\nspec:\n%s%s" % (name, spec, extra)


def remove_instance(instance):
    """Removes every container, volume and network labelled with this operator instance
    (and the config volumes Docker may have re-created without labels in a removal race)."""
    ids = docker("ps", "-aq", "--filter", "label=ai.molecule.instance=" + instance, check=False).split()
    names = docker("inspect", "-f", "{{.Name}}", *ids, check=False).split() if ids else []
    for chunk in range(0, len(ids), 50):
        docker("rm", "-f", "-v", *ids[chunk:chunk + 50], check=False)
    vols = [n.lstrip("/") + "-configs" for n in names]
    vols += docker("volume", "ls", "-q", "--filter", "label=ai.molecule.instance=" + instance, check=False).split()
    vols = sorted(set(vols))
    for chunk in range(0, len(vols), 50):
        docker("volume", "rm", "-f", *vols[chunk:chunk + 50], check=False)
    # The workspaces' own network, made by the operator (src/runtime/network.rs).
    for net in docker("network", "ls", "-q", "--filter", "label=ai.molecule.instance=" + instance, check=False).split():
        docker("network", "rm", net, check=False)


class Operator:
    """One `molecule-operator up` on a generated directory, with its own state dir,
    port and instance id (so concurrent benches never touch each other)."""

    def __init__(self, binary, names, tier=None, tag="bench", extra_args=()):
        self.bin = binary
        self.dir = tempfile.mkdtemp(prefix="%s-org-" % tag)
        self.state = tempfile.mkdtemp(prefix="%s-state-" % tag)
        self.port = free_port()
        self.instance = "%s%d-%d" % (tag, os.getpid(), self.port)
        self.extra_args = list(extra_args)
        self.proc = None
        self.started_at = None
        for n in names:
            with open(os.path.join(self.dir, n + ".yaml"), "w") as f:
                f.write(workspace_yaml(n, tier))

    def start(self):
        log = open(os.path.join(self.state, "operator.log"), "ab")
        self.started_at = time.time()
        self.proc = subprocess.Popen([self.bin, "up", self.dir, "--state", self.state, "--listen", "127.0.0.1:%d" % self.port,
                                      "--instance", self.instance, *self.extra_args], stdout=log, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill(); self.proc.wait()
            self.proc = None

    def workspaces(self):
        try:
            tok = open(os.path.join(self.state, "admin-token")).read().strip()
            req = urllib.request.Request("http://127.0.0.1:%d/api/v1/workspaces" % self.port, headers={"Authorization": "Bearer " + tok})
            with urllib.request.urlopen(req, timeout=5) as r:
                return {w["name"]: w for w in json.load(r)}
        except Exception:
            return None

    def log_tail(self, n=2000):
        try:
            return open(os.path.join(self.state, "operator.log"), errors="replace").read()[-n:]
        except OSError:
            return ""

    def wait(self, pred, deadline=60, interval=0.01):
        t0 = time.time()
        while time.time() - t0 < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError("operator exited (%s); log: %s" % (self.proc.returncode, self.log_tail()))
            ws = self.workspaces()
            if ws is not None and pred(ws):
                return ws
            time.sleep(interval)
        raise RuntimeError("timed out; log: " + self.log_tail())

    def cleanup(self):
        if self.proc:
            self.proc.kill(); self.proc.wait(); self.proc = None
        remove_instance(self.instance)
        shutil.rmtree(self.dir, ignore_errors=True); shutil.rmtree(self.state, ignore_errors=True)


def online(w):
    return w.get("phase") == "Running" and w.get("container") and w.get("lastHeartbeatAt")
