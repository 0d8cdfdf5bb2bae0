"""Metrics (include/drun/metrics.hpp): `drun serve --metrics-listen` scraped by a real Prometheus
server started here on loopback, `--metrics-file` of fetch and the cache commands, every exposition
linted by promtool, the figures checked against what actually moved, and the endpoint's answers
to hostile requests."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from peerkit import Serve, free_port
from test_peers import N, LyingPeer, manifest_json, swarm, write_policy  # noqa: F401 (swarm is a fixture)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
need_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL) and not os.environ.get("CI"),
    reason="Debian's prometheus package (prometheus, promtool) is not installed; scripts/bootstrap.sh installs it")


def samples(text):
    """{'name{labels}': value} of an exposition text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def promtool_lint(text):
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def raw_request(port, data, timeout=8):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got.decode(errors="replace")


class Prometheus:
    """A Prometheus server on loopback scraping `targets` every second, its data in `d`."""

    def __init__(self, d, targets):
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       "scrape_configs:\n  - job_name: drun\n    static_configs:\n"
                       f"      - targets: {json.dumps(targets)}\n")
        self.port = free_port()
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={d / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "prometheus.log", "w"))
        self.log = d / "prometheus.log"
        end = time.time() + 30
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready: " + self.log.read_text()[-2000:])

    def query(self, expr):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr, predicate, timeout=30):
        end, last = time.time() + timeout, None
        while time.time() < end:
            last = self.query(expr)
            if last and predicate(float(last[0]["value"][1])):
                return float(last[0]["value"][1])
            time.sleep(0.5)
        raise AssertionError(f"{expr}: {last}; prometheus log: {self.log.read_text()[-1500:]}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@need_prometheus
def test_prometheus_scrapes_serve_and_the_served_bytes_match_what_the_leecher_got(swarm, tmp_path):  # noqa: F811
    mport = free_port()
    seed = swarm.serve(extra=["--metrics-listen", f"127.0.0.1:{mport}"])
    assert f"metrics on port {mport}" in seed.proc.stdout.readline() + seed.proc.stdout.readline()
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{mport}"])
    try:
        prom.wait_for('up{job="drun"}', lambda v: v == 1)
        mfile = tmp_path / "leech.prom"
        swarm.fetch(seed.addr, extra=["--metrics-file", mfile]).ok()
        leech = mfile.read_text()
        promtool_lint(leech)
        got = samples(leech)
        model_bytes = sum(p.stat().st_size for p in swarm.model.rglob("*") if p.is_file())
        assert got['drun_fetch_bytes_total{source="peer"}'] == model_bytes
        assert got['drun_fetch_pieces_total{source="peer"}'] == N
        assert got['drun_fetches_total{result="ok"}'] == 1 and got['drun_fetches_total{result="failed"}'] == 0
        assert got["drun_fetch_duration_seconds_count"] == 1
        # Through Prometheus's own query API: what the seed says it served is what the leecher stored.
        served = prom.wait_for("drun_peer_bytes_served_total", lambda v: v >= model_bytes)
        assert served == got['drun_fetch_bytes_total{source="peer"}']
        assert prom.wait_for("drun_peer_pieces_served_total", lambda v: v >= N) == N
        assert prom.wait_for("drun_store_pieces", lambda v: v > 0) == N
        assert prom.wait_for("drun_store_bytes", lambda v: v > 0) == model_bytes
        promtool_lint(scrape(mport))
    finally:
        prom.stop()
        stats = seed.stop()
    assert stats["pieces"] == N


def test_refusals_are_counted_by_reason_without_addresses_or_subjects(swarm, tmp_path):  # noqa: F811
    mport = free_port()
    policy = write_policy(tmp_path / "policy.json",
                          [{"certificate": {"uri": "spiffe://cluster/ns/ml/sa/loader"}, "roles": ["other"]}],
                          {"other": {"artifacts": ["0" * 64]}})
    seed = swarm.serve(extra=["--metrics-listen", str(mport), "--policy", policy])
    swarm.fetch(seed.addr, store="nocert", cert=False).fails(3)     # no client certificate: tls
    swarm.fetch(seed.addr, store="denied").fails(4)                 # certified, but the policy says no
    text = scrape(mport)
    promtool_lint(text)
    got = samples(text)
    assert got['drun_peer_connections_refused_total{reason="tls"}'] >= 1
    assert got["drun_peer_authorization_denials_total"] >= 1
    assert got["drun_peer_bytes_served_total"] == 0
    # Nothing in the exposition names a caller: no address, no certificate subject, no SPIFFE id.
    for secretish in ("127.0.0.1", "spiffe://", "loader", "leecher", swarm.artifact):
        assert secretish not in text, secretish
    seed.stop()


def test_a_lying_peer_shows_as_rejected_pieces_and_a_ban(swarm, drun, tmp_path):  # noqa: F811
    liar = LyingPeer(swarm.pki, swarm.model, swarm.sig, manifest_json(drun, swarm.sig))
    seed = swarm.serve()
    mfile = tmp_path / "m.prom"
    try:
        swarm.fetch(liar.addr, seed.addr, extra=["--metrics-file", mfile]).ok()
        got = samples(mfile.read_text())
        assert got['drun_fetch_pieces_rejected_total{source="peer"}'] >= 1
        assert got['drun_fetch_pieces_rejected_total{source="origin"}'] == 0
        assert got["drun_fetch_peers_banned_total"] == 1
        assert got["drun_fetch_retries_total"] >= 1
        # A fetch that fails is a figure too: the file is written, and says so.
        swarm.fetch(liar.addr, store="s2", extra=["--metrics-file", mfile]).fails(1, "digest mismatch")
        got = samples(mfile.read_text())
        assert got['drun_fetches_total{result="failed"}'] == 1 and got['drun_fetches_total{result="ok"}'] == 0
    finally:
        liar.stop()


def test_cache_commands_write_their_figures(swarm, drun, tmp_path):  # noqa: F811
    store = ["--store", tmp_path / "seed", "--key-source", swarm.ks]
    mfile = tmp_path / "cache.prom"
    # Damage one sealed piece: the scrub finds it, and the metrics file counts it.
    data = max((tmp_path / "seed" / "artifacts").glob("*/data/*"), key=lambda p: p.stat().st_size)  # weights.bin
    with open(data, "r+b") as f:
        f.seek(300 << 10)
        b = f.read(1)
        f.seek(300 << 10)
        f.write(bytes([b[0] ^ 1]))
    drun("cache", "verify", *store, "--metrics-file", mfile).fails(1)
    text = mfile.read_text()
    promtool_lint(text)
    got = samples(text)
    assert got["drun_store_scrub_findings_total"] == 1 and got["drun_store_open_failures_total"] == 1
    drun("cache", "gc", "--ttl", "0", *store, "--metrics-file", mfile).ok()
    assert samples(mfile.read_text())["drun_store_gc_evictions_total"] == 1
    # The file is replaced, never appended to or left half-written; no temporary file stays behind.
    assert [p.name for p in tmp_path.glob(".cache.prom*")] == []
    # A metrics file that cannot be written fails a command that succeeded (exit 3), naming it.
    drun("cache", "ls", *store, "--metrics-file", tmp_path / "absent" / "m.prom").fails(3, "--metrics-file")
    drun("cache", "ls", *store, "--metrics-file", "").fails(2, "--metrics-file")


def test_the_metrics_endpoint_answers_hostile_requests_and_stays_up(swarm, tmp_path):  # noqa: F811
    mport = free_port()
    seed = swarm.serve(extra=["--metrics-listen", str(mport)])
    assert raw_request(mport, b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n").startswith("HTTP/1.1 404")
    assert raw_request(mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith("HTTP/1.1 405")
    assert raw_request(mport, b"garbage\r\n\r\n").startswith("HTTP/1.1 400")
    assert raw_request(mport, b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 10000 + b"\r\n\r\n").startswith(
        "HTTP/1.1 431")
    # A caller that stalls mid-request is cut off after 2 s; the next scrape is served.
    stalled = socket.create_connection(("127.0.0.1", mport))
    stalled.sendall(b"GET /metrics HTTP/1.1\r\n")
    t = time.time()
    assert "drun_peer_connections_total" in scrape(mport)
    assert time.time() - t < 4
    stalled.close()
    # The endpoint is on loopback unless told otherwise: "PORT" alone does not listen on other addresses.
    out = subprocess.run(["ss", "-ltnH", f"sport = :{mport}"], capture_output=True, text=True).stdout
    assert [line.split()[3] for line in out.splitlines()] == [f"127.0.0.1:{mport}"], out
    seed.stop()
    with pytest.raises(RuntimeError, match="metrics address"):
        Serve(os.environ["DRUN_BIN"], tmp_path / "seed", swarm.ks, swarm.server_cert, swarm.server_key, swarm.pki.ca,
              extra=["--metrics-listen", "not an address"])
