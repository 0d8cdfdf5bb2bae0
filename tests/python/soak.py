"""A soak of `drun serve`: well-behaved leechers and hostile clients at once, for a set time.

- Leechers: LEECHERS concurrent loops of `drun fetch --peer` (each into a fresh store: every
  piece checked against the signed manifest, the bundle from the peer verified against the
  publisher's key). A leecher's fetch must succeed with no error charged to the peer. Each is a
  host of its own: its own certificate, and its own loopback address (127.0.1.N).
- Hostile clients, from another loopback address (127.0.0.2: another host, as the server shares
  its handshake slots out by address): slow readers (ask for a piece and never read), half-open
  TLS (a partial ClientHello, then nothing), silent sockets, garbage frames after the HELLO,
  expired tokens, frame lengths far over their bound, and a reconnect storm.
- The server's RSS, open descriptors and threads are sampled every second. They must stay under
  the bounds below during the load, and come back to (near) their baseline after it.

The embedded case (--embedded): the server is a `drun.PeerServer` inside a Python process that
keeps doing its own work (hashing a buffer in a loop, reporting every second): that work must
go on under the load (no pause of 2 s or more: the server's threads never hold the GIL).

tests/python/test_soak.py runs both for 60 s in CI; benchmarks/soak.sh for 10 minutes:
    /usr/bin/python3 tests/python/soak.py --drun build/drun --seconds 600 --work /tmp/soak
"""

import argparse
import base64
import json
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peerkit import PKI, Serve, free_port, seeded_store, signed_model  # noqa: E402
from peerwire import GET_PIECE, Client, Closed, PeerError, proc_status, rss_mib, threads  # noqa: E402

HOSTILE_SOURCE = "127.0.0.2"
# Bounds for the server under load: its piece buffers are capped by memory_budget (256 MiB by
# default); threads and descriptors follow the connections open at once.
MAX_RSS_MIB = 512
MAX_FDS = 600  # the leechers hold at most 128 connections, the hostile clients a few dozen
MAX_THREADS = 300
# After the load: back to the baseline, give or take what the allocator keeps.
SETTLE_SECONDS = 75  # idle connections close after the idle timeout (60 s)
RSS_SLACK_MIB = 160


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def expired_token(private_pem, audience):
    """An EdDSA JWT signed by the server's trusted key but expired an hour ago (python3-cryptography)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_pem, password=None)
    now = int(time.time())
    header = b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": "mallory", "aud": audience, "exp": now - 3600, "nbf": now - 7200,
                                "drun_artifacts": ["*"]}).encode())
    signing_input = header + b"." + claims
    return signing_input + b"." + b64url(key.sign(signing_input))


# The host of the embedded case: serves the store from a drun.PeerServer and hashes 1 MiB in a
# loop, printing each second how many it did and the longest gap between two; on SIGTERM it stops
# the server and prints its stats as JSON.
EMBEDDED_HOST = r"""
import hashlib, json, signal, sys, time
import drun
store_dir, key_source, cert, key, ca, jwks, audience, metrics_port = sys.argv[1:9]
store = drun.Store(store_dir, key_source=key_source)
server = drun.PeerServer(store, cert=cert, key=key, client_ca=ca, jwks=jwks, audience=audience,
                         max_connections=1024,  # as the served case's --max-connections (see there)
                         metrics_listen=metrics_port)
print("port", server.port, flush=True)
stopping = []
signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
buf, n, worst, last, mark = b"w" * (1 << 20), 0, 0.0, time.monotonic(), time.monotonic()
while not stopping:
    hashlib.sha256(buf).digest()
    now = time.monotonic()
    n, worst, last = n + 1, max(worst, now - last), now
    if now - mark >= 1:
        print("work", n, round(worst, 3), flush=True)
        n, worst, mark = 0, 0.0, now
server.stop()
print("stats", json.dumps(server.stats()), flush=True)
"""


class EmbeddedServe:
    """Serve's interface (port, addr, proc, stop()) over EMBEDDED_HOST, reading its work reports."""

    def __init__(self, store, key_source, cert, key, ca, jwks, audience, log, metrics_port, python="/usr/bin/python3"):
        # The library's warnings (one per hostile client) go to a file: a pipe nobody reads
        # would fill and stall the logging threads.
        self.log = open(log, "w")
        self.proc = subprocess.Popen([python, "-c", EMBEDDED_HOST, *map(str, (store, key_source, cert, key, ca, jwks,
                                                                              audience, metrics_port))],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        first = self.proc.stdout.readline().split()
        if len(first) != 2 or first[0] != "port":
            raise RuntimeError(f"the embedded host did not start: {first} {Path(log).read_text()[-2000:]}")
        self.port = int(first[1])
        self.addr = f"127.0.0.1:{self.port}"
        self.work, self.stats_line = [], None  # (iterations in the second, longest gap in s)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = line.split(maxsplit=1)
            if parts and parts[0] == "work":
                n, worst = parts[1].split()
                self.work.append((int(n), float(worst)))
            elif parts and parts[0] == "stats":
                self.stats_line = json.loads(parts[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        self.log.close()
        st = self.stats_line or {}
        return {"connections": st.get("connections"), "requests": st.get("requests"),
                "pieces": st.get("pieces_served"), "denied": st.get("denied"),
                "handshakes_refused": st.get("handshake_failures"), "protocol_errors": st.get("protocol_errors"),
                "busy": st.get("busy")}


class Soak:
    def __init__(self, drun_bin, work, leechers=64, pieces=16, piece_size=256 << 10, embedded=False):
        self.drun_bin, self.work, self.leechers = str(drun_bin), Path(work), leechers
        self.work.mkdir(parents=True, exist_ok=True)
        self.errors = []  # good-client failures: the run fails if any
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.fetches = 0
        self.hostile = {}
        self.samples = []

        class Ran:
            def __init__(self, p):
                self.out, self.err = p.stdout, p.stderr

            def ok(self):
                return self

        def drun(*args):
            p = subprocess.run([self.drun_bin, *map(str, args)], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"drun {' '.join(map(str, args))}: exit {p.returncode}: {p.stderr}")
            return Ran(p)

        w = self.work
        drun("keygen", "--type", "ecdsa-p256", "--out", w / "publisher.key")
        drun("keygen", "--type", "ed25519", "--out", w / "issuer.key")
        self.pub = w / "publisher.key.pub"
        (w / "jwks.json").write_text(drun("token", "jwks", "--public-key", w / "issuer.key.pub").out)
        self.issuer_pem = (w / "issuer.key").read_bytes()
        self.ks = f"file:{w / 'node.key'}"
        (w / "node.key").write_text(os.urandom(32).hex() + "\n")
        os.chmod(w / "node.key", 0o600)
        self.model, self.sig, self.artifact = signed_model(drun, w / "model", w / "publisher.key",
                                                           size=pieces * piece_size, piece=piece_size, seed=5)
        seeded_store(drun, w / "seed", self.ks, self.model, self.sig, self.pub)
        self.pki = PKI(w / "pki")
        self.server_cert, self.server_key = self.pki.issue("server")
        # Each leecher is a host of its own, as the machines of a fleet are: its own certificate
        # (its own caller for the server's shares of buffers) and its own loopback address
        # (127.0.1.N; the server shares handshake slots out by address).
        self.leecher_certs = [self.pki.issue(f"leecher-{n}") for n in range(leechers)]
        self.leecher_addresses = [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in range(leechers)]
        self.mallory_cert, self.mallory_key = self.pki.issue("mallory")
        self.audience = "drun-soak"
        self.embedded = embedded
        self.metrics_port = free_port()
        if embedded:
            self.server = EmbeddedServe(w / "seed", self.ks, self.server_cert, self.server_key, self.pki.ca,
                                        w / "jwks.json", self.audience, log=w / "server.log",
                                        metrics_port=self.metrics_port)
        else:
            self.server = Serve(self.drun_bin, w / "seed", self.ks, self.server_cert, self.server_key, self.pki.ca,
                                extra=["--jwks", w / "jwks.json", "--audience", self.audience,
                                       # Sized for the load, as an operator would: the default
                                       # 256 connections give 64 handshake slots, fewer than the
                                       # 128 connections 64 leechers open when they start together.
                                       "--max-connections", "1024",
                                       "--metrics-listen", str(self.metrics_port)],
                                log=w / "server.log")
        self.leecher_connections = "2"
        self.pid = self.server.proc.pid
        (w / "leechers").mkdir()

    # --- the load ------------------------------------------------------------------------------

    def leecher(self, n):
        i = 0
        while not self.stop.is_set():
            store = self.work / "leechers" / f"{n}-{i}"
            i += 1
            p = subprocess.run([self.drun_bin, "fetch", "--signature", str(self.sig), "--public-key", str(self.pub),
                                "--store", str(store), "--key-source", self.ks, "--ca-cert", str(self.pki.ca),
                                "--tls-cert", str(self.leecher_certs[n][0]), "--tls-key", str(self.leecher_certs[n][1]),
                                "--peer", self.server.addr, "--connections", self.leecher_connections,
                                "--local-address", self.leecher_addresses[n]],
                               capture_output=True, text=True, timeout=300)
            shutil.rmtree(store, ignore_errors=True)
            charged = re.search(rf"peer {re.escape(self.server.addr)}: \d+ pieces, (\d+) rejected, (\d+) errors", p.stdout)
            with self.lock:
                if p.returncode != 0 or not charged or charged.groups() != ("0", "0"):
                    self.errors.append(f"leecher {n}: exit {p.returncode}\n{p.stdout[-800:]}{p.stderr[-800:]}")
                else:
                    self.fetches += 1

    def count(self, what):
        with self.lock:
            self.hostile[what] = self.hostile.get(what, 0) + 1

    def tls(self, cert=True, timeout=10.0):
        return Client(self.server.port, self.pki.ca, self.mallory_cert if cert else None,
                      self.mallory_key if cert else None, timeout=timeout, source=HOSTILE_SOURCE)

    def raw(self, timeout=5.0):
        return socket.create_connection(("127.0.0.1", self.server.port), timeout=timeout,
                                        source_address=(HOSTILE_SOURCE, 0))

    def hostile_loop(self, what, once):
        while not self.stop.is_set():
            try:
                once()
            except (OSError, ssl.SSLError, Closed, PeerError, EOFError, TimeoutError):
                pass  # the server hanging up on a hostile client is the point
            self.count(what)

    def slow_reader(self):
        c = self.tls()
        try:
            c.welcome(version=2)
            c.send_frame(GET_PIECE, bytes.fromhex(self.artifact) + struct.pack(">II", 1, 0))
            self.stop.wait(random.uniform(5, 15))  # and never read the answer
        finally:
            c.close()

    def half_open_tls(self):
        s = self.raw()
        try:
            # The first bytes of a TLS record header and a ClientHello, then nothing more.
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
            self.stop.wait(random.uniform(2, 12))
        finally:
            s.close()

    def silent_socket(self):
        s = self.raw()
        try:
            self.stop.wait(random.uniform(1, 4))
        finally:
            s.close()

    def garbage_frames(self):
        with self.tls() as c:
            c.welcome(version=2)
            c.send_raw(os.urandom(random.randint(1, 300)))
            c.read_frame()

    def expired(self):
        with self.tls() as c:
            c.welcome(version=2, token=expired_token(self.issuer_pem, self.audience))

    def oversized(self):
        with self.tls() as c:
            c.welcome(version=2)
            c.send_raw(struct.pack(">BI", GET_PIECE, 0xFFFFFFF0))
            c.read_frame()

    def reconnect_storm(self):
        for _ in range(20):
            self.raw().close()
        time.sleep(0.05)

    def turned_away(self):
        """What the server turned away, by why, from its /metrics: connections refused (limit,
        address, tls, authorization) and piece requests answered busy."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        got = {m.group(1): int(float(m.group(2))) for m in
               re.finditer(r'^drun_peer_connections_refused_total\{reason="(\w+)"\} (\S+)$', text, re.M)}
        busy = re.search(r"^drun_peer_busy_answers_total (\S+)$", text, re.M)
        got["busy_answers"] = int(float(busy.group(1))) if busy else None
        return got

    def sample(self):
        try:
            s = (time.time(), rss_mib(self.pid), fd_count(self.pid), threads(self.pid))
        except (FileNotFoundError, ProcessLookupError):
            return None
        self.samples.append(s)
        return s

    def run(self, seconds, log=print):
        time.sleep(1)
        base = self.sample()
        log(f"baseline: RSS {base[1]:.0f} MiB, {base[2]} fds, {base[3]} threads")
        workers = [threading.Thread(target=self.leecher, args=(n,), daemon=True) for n in range(self.leechers)]
        hostile = {"slow_reader": (self.slow_reader, 8), "half_open_tls": (self.half_open_tls, 8),
                   "silent_socket": (self.silent_socket, 4), "garbage_frames": (self.garbage_frames, 2),
                   "expired_token": (self.expired, 2), "oversized_length": (self.oversized, 2),
                   "reconnect_storm": (self.reconnect_storm, 1)}
        for what, (once, n) in hostile.items():
            workers += [threading.Thread(target=self.hostile_loop, args=(what, once), daemon=True) for _ in range(n)]
        for t in workers:
            t.start()
        peak = list(base)
        end = time.time() + seconds
        while time.time() < end and self.server.proc.poll() is None:
            s = self.sample()
            if s:
                peak = [max(a, b) for a, b in zip(peak, s)]
            time.sleep(1)
        self.stop.set()
        for t in workers:
            t.join(timeout=120)
        log(f"load: {seconds} s, {self.fetches} verified fetches by {self.leechers} leechers, hostile "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.hostile.items())))
        log(f"peak: RSS {peak[1]:.0f} MiB, {peak[2]} fds, {peak[3]} threads "
            f"(bounds {MAX_RSS_MIB} MiB, {MAX_FDS}, {MAX_THREADS})")
        settled, after = False, None
        until = time.time() + SETTLE_SECONDS
        while time.time() < until and self.server.proc.poll() is None:
            after = self.sample()
            if after and after[2] <= base[2] + 2 and after[3] <= base[3] + 2 and after[1] <= base[1] + RSS_SLACK_MIB:
                settled = True
                break
            time.sleep(1)
        if after:
            log(f"after: RSS {after[1]:.0f} MiB, {after[2]} fds, {after[3]} threads "
                f"({'back to the baseline' if settled else 'NOT back to the baseline'} "
                f"{after[0] - end:.0f} s after the load)")
        alive = self.server.proc.poll() is None
        exit_status = self.server.proc.returncode
        refused = self.turned_away() if alive else {}
        log(f"turned away: {refused}")
        stats = self.server.stop()
        log(f"server: {stats}")
        work = None
        if self.embedded:
            # Seconds of the host's work during the load (the first and last are partial).
            during = self.server.work[2:2 + seconds - 2]
            work = {"seconds": len(during), "min_per_second": min((n for n, _ in during), default=0),
                    "longest_gap": max((g for _, g in during), default=0.0)}
            log(f"host work under the load: {work['seconds']} s reported, at least {work['min_per_second']} MiB "
                f"hashed each second, longest pause {work['longest_gap']:.3f} s")
        return {"base": base, "peak": peak, "after": after, "settled": settled, "alive": alive, "stats": stats,
                "refused": refused, "exit_status": exit_status,
                "fetches": self.fetches, "errors": self.errors, "hostile": dict(self.hostile), "work": work}


def check(result):
    """The soak's verdict: a list of what went wrong (empty: it passed)."""
    problems = list(result["errors"][:5])
    if not result["alive"]:
        problems.append(f"the server died under the load (exit status {result['exit_status']})")
    if result["fetches"] == 0:
        problems.append("no fetch completed")
    _, rss, fds, thr = result["peak"]
    if rss > MAX_RSS_MIB or fds > MAX_FDS or thr > MAX_THREADS:
        problems.append(f"over a bound under load: RSS {rss:.0f} MiB, {fds} fds, {thr} threads")
    if not result["settled"]:
        problems.append(f"not back to the baseline {result['base']} after the load: {result['after']}")
    work = result.get("work")
    if work is not None:
        if work["seconds"] == 0 or work["min_per_second"] == 0:
            problems.append(f"the embedding process's own work stopped under the load: {work}")
        elif work["longest_gap"] >= 2.0:
            problems.append(f"the embedding process's own work paused {work['longest_gap']:.1f} s under the load")
    for what in ("slow_reader", "half_open_tls", "garbage_frames", "expired_token", "oversized_length",
                 "reconnect_storm"):
        if result["hostile"].get(what, 0) == 0:
            problems.append(f"no {what} client ran")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drun", default=os.environ.get("DRUN_BIN", "build/drun"))
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--leechers", type=int, default=64)
    ap.add_argument("--work", default="/tmp/drun-soak")
    ap.add_argument("--embedded", action="store_true", help="serve from a drun.PeerServer in a Python host")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    what = "an embedded drun.PeerServer" if a.embedded else "drun serve"
    print(f"soak of {what} on {cpu}, {os.cpu_count()} cores, {a.seconds} s, {a.leechers} leechers")
    result = Soak(a.drun, a.work, leechers=a.leechers, embedded=a.embedded).run(a.seconds)
    problems = check(result)
    for p in problems:
        print("FAILED:", p)
    if problems:
        print(f"kept for a look: {a.work} (the server's log: {a.work}/server.log)")
    else:
        shutil.rmtree(a.work, ignore_errors=True)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
