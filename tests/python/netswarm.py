"""A swarm in network namespaces (root only): N nodes and an origin (nginx), each in a namespace of
its own behind a veth link on one bridge, every link shaped by tc to the same rate in both
directions. Every node runs `drun serve` on its store and `drun fetch` from the origin and every
other member (--swarm-self, so that the origin sends each piece about once), all started
together. Faults during the transfer (--chaos):

  loss            2 % packet loss each way on every other node's link (nftables, on the link's two
                  ends), and 20 ms +- 5 ms of delay where the kernel has sch_netem
  cut             one node's link down 1 s after the start, up again 4 s later
  seed-kill       a seed (the whole artifact imported before the start) that every node knows,
                  killed 1 s in and restarted 3 s later
  origin-restart  nginx killed 1 s in and started again 2 s later
  disk-full       one node's store on a tmpfs half the artifact's size: that node fails, naming
                  the full disk, with nothing unverified stored; the others finish
  liar            a member that speaks the protocol and flips a byte of every piece it serves
                  (peerwire.LyingPeer): every honest node must ban it

check() lists what went wrong: an honest node that did not end with the artifact verified (its
fetch exit status, `drun cache verify` of its store), a liar that some node did not ban, origin
egress over its bound. benchmarks/swarm.sh prints the figures; test_chaos.py runs each fault at CI
size.

    /usr/bin/python3 tests/python/netswarm.py DRUN_BIN WORK [--nodes N] [--rate MBIT] [--size-mib S]
        [--piece-size P] [--chaos MODE]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peerkit import PKI  # noqa: E402

CHAOS = ("none", "loss", "cut", "seed-kill", "origin-restart", "disk-full", "liar")
PORT = 7070


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True)


def ns_argv(ns, *argv):
    return ["ip", "netns", "exec", ns, *map(str, argv)]


class NetSwarm:
    def __init__(self, drun, work, nodes=4, rate_mbit=40, size=16 << 20, piece=None, chaos="none", net=78,
                 prefix="drc"):
        """net: the second byte of the swarm's 10.net.0.0/24 (benchmarks and tests use different
        ones); prefix: of the namespaces, the bridge and the host ends of the links (short:
        interface names have 15 bytes)."""
        assert chaos in CHAOS, chaos
        self.drun, self.work = str(drun), Path(work)
        self.nodes, self.rate, self.size, self.piece, self.chaos = nodes, rate_mbit, size, piece, chaos
        self.net, self.prefix, self.bridge = net, prefix, f"{prefix}br"
        self.namespaces, self.procs, self.mounts, self.tables = [], [], [], []
        self.events = []  # (seconds since the start, what the chaos did)
        self.serves = {}  # node index (or "seed") -> Popen
        self.origin = None

    # -- addresses and names
    def ip(self, who):
        host = {"origin": 2, "seed": 3, "liar": 4}.get(who)
        return f"10.{self.net}.0.{host if host else 10 + who}"

    def ns(self, who):
        return f"{self.prefix}-{who if isinstance(who, str) else f'n{who}'}"

    def veth(self, who):
        return f"{self.prefix}v{who[0] if isinstance(who, str) else who}"

    def members(self):
        """Every serving address a node is told of: the nodes, then the seed or the liar."""
        out = [f"{self.ip(i)}:{PORT}" for i in range(self.nodes)]
        out += [f"{self.ip(x)}:{PORT}" for x in ("seed", "liar") if self.chaos == ("seed-kill" if x == "seed" else x)]
        return out

    # -- lifetime
    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for m in reversed(self.mounts):
            sh("umount", "-l", m, check=False)
        for ns, veth in self.namespaces:
            sh("ip", "link", "del", veth, check=False)  # both ends, now (a namespace goes lazily)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        for t in self.tables:  # the host ends' (those in the namespaces went with them)
            sh("nft", "delete", "table", "netdev", t, check=False)

    def spawn(self, argv, log):
        with open(log, "w") as out:  # the child keeps its own descriptor
            p = subprocess.Popen(list(map(str, argv)), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def setup(self):
        d = self.work
        if d.exists():
            shutil.rmtree(d)
        (d / "model").mkdir(parents=True)
        with open(d / "model" / "weights.bin", "wb") as f:
            for _ in range(0, self.size, 1 << 24):
                f.write(os.urandom(min(1 << 24, self.size - f.tell())))
        drun = lambda *a: sh(self.drun, *a)  # noqa: E731
        drun("keygen", "--type", "ed25519", "--out", d / "publisher.key")
        drun("sign", d / "model", "--key", d / "publisher.key", "--signature", d / "model.sig",
             *(["--piece-size", self.piece] if self.piece else []))
        drun("cache", "keygen", "--out", d / "node.key")
        self.key_source = f"file:{d / 'node.key'}"
        self.pieces = json.loads(drun("manifest", "--json", d / "model.sig").stdout)
        self.pki = PKI(d / "pki", "swarm CA")

        sh("ip", "link", "del", self.bridge, check=False)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"10.{self.net}.0.1/24", "dev", self.bridge)
        # Bridged frames skip iptables where br_netfilter is loaded (Docker's FORWARD policy drops).
        sh("ip", "link", "set", "dev", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables",
           "0", check=False)
        sh("ip", "link", "set", self.bridge, "up")
        self.attach("origin")
        for i in range(self.nodes):
            self.attach(i)
        if self.chaos == "loss":
            for i in range(0, self.nodes, 2):
                self.lossy(i, percent=2, delay="20ms 5ms")

        (d / "origin").mkdir()
        self.start_origin()
        if self.chaos == "seed-kill":
            self.attach("seed")
            drun("cache", "import", d / "model", "--signature", d / "model.sig", "--public-key",
                 d / "publisher.key.pub", "--store", d / "seed", "--key-source", self.key_source)
            self.serve("seed")
        if self.chaos == "liar":
            self.attach("liar")
            (d / "manifest.json").write_text(json.dumps(self.pieces))
            cert, key = self.pki.issue("liar", ip=self.ip("liar"), dns=None)
            p = self.spawn(ns_argv(self.ns("liar"), sys.executable, HERE / "peerwire.py", "liar",
                                   "--listen", f"{self.ip('liar')}:{PORT}", "--cert", cert, "--key", key,
                                   "--ca", self.pki.ca, "--model", d / "model", "--signature", d / "model.sig",
                                   "--manifest", d / "manifest.json"), d / "liar.log")
            self.wait_listening("liar", p)
        if self.chaos == "disk-full":
            store = d / f"n{self.nodes - 1}"
            store.mkdir()
            sh("mount", "-t", "tmpfs", "-o", f"size={self.size // 2},mode=0700", "tmpfs", store)
            self.mounts.append(store)
        for i in range(self.nodes):
            self.serve(i)

    def attach(self, who):
        ns, veth, ip = self.ns(who), self.veth(who), self.ip(who)
        sh("ip", "link", "del", veth, check=False)
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        self.namespaces.append((ns, veth))
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh(*ns_argv(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0"))
        sh(*ns_argv(ns, "ip", "link", "set", "eth0", "up"))
        sh(*ns_argv(ns, "ip", "link", "set", "lo", "up"))
        self.shape(who)

    def shape(self, who):
        """The link's rate, both ways."""
        tbf = ["tbf", "rate", f"{self.rate}mbit", "burst", "256kb", "latency", "50ms"]
        sh(*ns_argv(self.ns(who), "tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", *tbf))
        sh("tc", "qdisc", "replace", "dev", self.veth(who), "root", "handle", "1:", *tbf)

    def lossy(self, who, percent, delay):
        """Drops `percent` of the packets in each direction, at the ingress of both ends of the link
        (a loss on the wire, not a local send error), and delays them under the rate limit where
        the kernel has netem (some, such as this project's CI VMs, are built without it)."""
        rule = f"numgen random mod 1000 < {percent * 10} drop"
        for ns, dev in ((self.ns(who), "eth0"), (None, self.veth(who))):
            pre = ns_argv(ns, "nft") if ns else ["nft"]
            table = f"{self.prefix}{who}"
            sh(*pre, "delete", "table", "netdev", table, check=False)  # one a crashed run left
            sh(*pre, "add", "table", "netdev", table)
            if not ns:
                self.tables.append(table)
            sh(*pre, "add", "chain", "netdev", table, "in",
               f"{{ type filter hook ingress device {dev} priority 0; policy accept; }}")
            sh(*pre, "add", "rule", "netdev", table, "in", *rule.split())
            netem = ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", *delay.split()]
            ok = sh(*(ns_argv(ns, "tc") if ns else ["tc"]), *netem, check=False).returncode == 0
        self.events.append((0, f"{percent} % loss on n{who}'s link" + (f", {delay} delay" if ok else
                                                                       " (no delay: this kernel has no sch_netem)")))

    def wait_listening(self, who, proc, port=PORT, timeout=10):
        probe = f"import socket; socket.create_connection(('{self.ip(who)}', {port}), timeout=0.2).close()"
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{who} exited with {proc.returncode} before listening")
            if subprocess.run(ns_argv(self.ns(who), sys.executable, "-c", probe), capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{who} did not listen on {self.ip(who)}:{port}")

    def start_origin(self):
        o = self.work / "origin"
        temp = " ".join(f"{k}_temp_path {o / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (o / "nginx.conf").write_text(f"""
master_process off; daemon off; pid {o / 'nginx.pid'}; error_log {o / 'error.log'};
events {{ worker_connections 256; }}
http {{
  {temp} sendfile on;
  log_format bytes '$body_bytes_sent'; access_log {o / 'access.log'} bytes;
  server {{ listen {self.ip('origin')}:80; root {self.work / 'model'}; }}
}}
""")
        self.origin = self.spawn(ns_argv(self.ns("origin"), "nginx", "-c", o / "nginx.conf", "-p", o), o / "nginx.out")
        self.wait_listening("origin", self.origin, port=80)

    def serve(self, who):
        name = who if isinstance(who, str) else f"n{who}"
        cert, key = self.pki.issue(name, ip=self.ip(who), dns=None)
        p = self.spawn(ns_argv(self.ns(who), self.drun, "serve", "--store", self.work / name, "--key-source",
                               self.key_source, "--listen", f"{self.ip(who)}:{PORT}", "--tls-cert", cert,
                               "--tls-key", key, "--client-ca", self.pki.ca), self.work / f"serve-{name}.log")
        self.wait_listening(who, p)
        self.serves[who] = p

    def kill(self, proc):
        proc.kill()
        proc.wait()

    # -- the run
    def fetch_argv(self, i):
        d = self.work
        argv = [self.drun, "fetch", "--signature", d / "model.sig", "--public-key", d / "publisher.key.pub",
                "--origin", f"http://{self.ip('origin')}", "--swarm-self", f"{self.ip(i)}:{PORT}",
                "--ca-cert", self.pki.ca, "--tls-cert", d / "pki" / f"n{i}.pem", "--tls-key", d / "pki" / f"n{i}.key",
                "--store", d / f"n{i}", "--key-source", self.key_source]
        for m in self.members():
            argv += ["--peer", m]
        return ns_argv(self.ns(i), *argv)

    def chaos_timeline(self):
        """(at seconds, action, description) of this run's fault."""
        last = f"n{self.nodes - 1}"
        if self.chaos == "cut":
            return [(1, lambda: sh("ip", "link", "set", self.veth(1), "down"), "n1's link cut"),
                    (5, lambda: sh("ip", "link", "set", self.veth(1), "up"), "n1's link restored")]
        if self.chaos == "seed-kill":
            return [(1, lambda: self.kill(self.serves["seed"]), "the seed killed"),
                    (4, lambda: self.serve("seed"), "the seed restarted")]
        if self.chaos == "origin-restart":
            return [(1, lambda: self.kill(self.origin), "the origin killed"),
                    (3, self.start_origin, "the origin restarted")]
        if self.chaos == "disk-full":
            return [(0, lambda: None, f"{last}'s store on a {self.size // 2 >> 20} MiB tmpfs")]
        if self.chaos == "liar":
            return [(0, lambda: None, f"a liar at {self.ip('liar')}:{PORT}")]
        return []

    def run(self, timeout=300):
        d = self.work
        start = time.time()
        fetches = [self.spawn(self.fetch_argv(i), d / f"fetch{i}.log") for i in range(self.nodes)]
        done = [None] * self.nodes

        def faults():  # in a thread of its own: a restart that waits for its listener delays no timing
            for at, action, what in self.chaos_timeline():
                time.sleep(max(0.0, start + at - time.time()))
                action()
                self.events.append((round(time.time() - start, 2), what))

        chaos = threading.Thread(target=faults, daemon=True)
        chaos.start()
        while any(t is None for t in done):
            now = time.time() - start
            for i, p in enumerate(fetches):
                if done[i] is None and p.poll() is not None:
                    done[i] = time.time() - start
            if now > timeout:
                for p in fetches:
                    if p.poll() is None:
                        p.kill()
                raise RuntimeError(f"the swarm did not finish in {timeout} s")
            time.sleep(0.05)
        chaos.join()  # a fault's end may come after every fetch finished
        # The access log counts bodies; the link counts every byte the origin sent, what a
        # killed nginx was sending when it died included (and the TCP/IP headers).
        egress = sum(int(x) for x in (d / "origin" / "access.log").read_text().split() if x.isdigit())
        link = int(sh(*ns_argv(self.ns("origin"), "cat", "/sys/class/net/eth0/statistics/tx_bytes")).stdout)
        timed = [at for at, what in self.events if at >= 0.5]  # the faults that happen during the run
        result = {"chaos": self.chaos, "events": self.events, "size": self.size, "egress": egress,
                  "egress_link": link, "ideal": self.size * 8 / (self.rate * 1e6), "nodes": [],
                  "fault_during_transfer": not timed or timed[0] < max(done)}
        for i, p in enumerate(fetches):
            out = (d / f"fetch{i}.log").read_text()
            verify = sh(self.drun, "cache", "verify", "--store", d / f"n{i}", "--key-source", self.key_source,
                        check=False)
            result["nodes"].append({"node": i, "rc": p.returncode, "seconds": done[i], "out": out,
                                    "verified": verify.returncode == 0, "verify": verify.stdout + verify.stderr,
                                    "from_origin": pieces_from(out, f"http://{self.ip('origin')}"),
                                    "liar": tally_of(out, f"peer {self.ip('liar')}:{PORT}")})
        result["last"] = max(n["seconds"] for n in result["nodes"] if n["rc"] == 0) if any(
            n["rc"] == 0 for n in result["nodes"]) else None
        return result


def tally_of(out, source):
    """The line of `drun fetch`'s report about `source` ("" if it has none)."""
    return next((l.strip() for l in out.splitlines() if l.strip().startswith(source + ": ")), "")


def pieces_from(out, source):
    line = tally_of(out, source)
    return int(line[len(source) + 2:].split()[0]) if line else 0


def check(result, max_egress=None):
    """What went wrong, as a list of sentences (empty: the swarm held)."""
    bad = []
    nodes = result["nodes"]
    full = len(nodes) - 1 if result["chaos"] == "disk-full" else None
    for n in nodes:
        if n["node"] == full:
            if n["rc"] == 0:
                bad.append(f"node {full} fetched on a store too small for the artifact")
            elif "No space left on device" not in n["out"]:
                bad.append(f"node {full} failed without naming the full disk: {n['out'][-400:]}")
        elif n["rc"] != 0:
            bad.append(f"node {n['node']} failed ({n['rc']}): {n['out'][-400:]}")
        if not n["verified"]:
            bad.append(f"node {n['node']}'s store does not verify: {n['verify'][-400:]}")
        if result["chaos"] == "liar" and n["node"] != full and "banned" not in n["liar"]:
            bad.append(f"node {n['node']} did not ban the liar: {n['liar'] or 'never asked it'}")
    if max_egress is not None and result["egress_link"] > max_egress * result["size"]:
        bad.append(f"origin egress {result['egress_link'] / result['size']:.2f}x the artifact (on its link), "
                   f"over {max_egress}x")
    if not result["fault_during_transfer"]:
        bad.append("the fault came after every fetch had finished: it tested nothing")
    return bad


def report(result):
    lines = [f"== chaos: {result['chaos']}" + "".join(f"; {what} at {at} s" for at, what in result["events"])]
    for n in result["nodes"]:
        state = "ok" if n["rc"] == 0 else f"exit {n['rc']}"
        extra = f"; the liar: {n['liar'].split(': ', 1)[1]}" if n["liar"] else ""
        lines.append(f"node {n['node']}: {n['seconds']:6.2f} s, {state}, store {'verifies' if n['verified'] else 'BROKEN'}, "
                     f"{n['from_origin']} pieces from the origin{extra}")
    lines.append(f"ideal (artifact / link rate)          : {result['ideal']:.2f} s")
    if result["last"] is not None:
        lines.append(f"last node done                         : {result['last']:.2f} s  "
                     f"({result['last'] / result['ideal']:.2f}x the ideal)")
    lines.append(f"origin egress                          : {result['egress'] / result['size']:.2f}x the artifact "
                 f"({result['egress']} bytes of bodies; {result['egress_link'] / result['size']:.2f}x on its link)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drun")
    ap.add_argument("work")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rate", type=int, default=200, help="Mbit/s of every link, each way")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--piece-size", default=None)
    ap.add_argument("--chaos", choices=CHAOS, default="none")
    ap.add_argument("--net", type=int, default=77)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("netswarm.py needs root (network namespaces)")
    print(f"== swarm: {a.nodes} nodes + origin, each link {a.rate} Mbit/s both ways, artifact {a.size_mib} MiB"
          + (f", pieces of {a.piece_size}" if a.piece_size else ""), flush=True)
    with NetSwarm(a.drun, a.work, a.nodes, a.rate, a.size_mib << 20, a.piece_size, a.chaos, a.net, "drun") as s:
        result = s.run(timeout=1800)
    print(report(result))
    problems = check(result)
    for p in problems:
        print("FAILED:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
