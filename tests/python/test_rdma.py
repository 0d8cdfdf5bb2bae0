"""RDMA from the outside: `drun serve --rdma` and `drun fetch --rdma` on hosts without RDMA fall
back to TCP+TLS and say so once; the flags are checked; `drun-bench tcp` prints perftest's report;
`drun-bench rdma` refuses clearly without a device.

Between two processes, RDMA runs here over a stand-in libibverbs (tests/fake_provider: the real
ABI, loaded through DRUN_IBVERBS_LIBRARY like the real one, carrying RC traffic over Unix
sockets): a model fetched with every piece over RDMA, a seed killed mid-transfer, and
drun-bench rdma. The fake-verbs tests of every RDMA error path are C++ (tests/unit).

With a real device (hardware, or soft-RoCE: `rdma link add rxe0 type rxe netdev IF` on a kernel
with rdma_rxe) the last tests do the same over it; without one they skip, saying why."""

import json
import os
import re
import subprocess
import time

import pytest

from peerkit import PKI, Serve, free_port
from test_peers import N, fetch_while_the_seed_is_killed, same_tree, swarm  # noqa: F401  (swarm: a fixture)

NO_LIBRARY = "/nonexistent/libibverbs.so.1"
REPORT_HEADER = " #bytes     #iterations    BW peak[{u}]    BW average[{u}]   MsgRate[Mpps]"


@pytest.fixture
def drun_bench():
    p = os.environ.get("DRUN_BENCH")
    if not p or not os.access(p, os.X_OK):
        if os.environ.get("DRUN_REQUIRE_BENCH") == "1":
            pytest.fail(f"DRUN_REQUIRE_BENCH=1 but DRUN_BENCH={p!r} is not an executable")
        pytest.skip("DRUN_BENCH is not set (drun-bench is built with the benchmarks)")
    return p


def bench(drun_bench, *args, env=None, timeout=60):
    return subprocess.run([drun_bench, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def tls_args(pki, name):
    cert, key = pki.issue(name)
    return ["--cert", cert, "--key", key, "--ca", pki.ca]


def rdma_unavailable_reason(drun_bench, pki):
    """Why this host cannot run RDMA (None when it can)."""
    r = bench(drun_bench, "rdma", "--client", "127.0.0.1", "--port", free_port(), *tls_args(pki, "probe"))
    m = re.search(r"RDMA is not available here: (.*)", r.stderr)
    return m.group(1) if m else None


def test_without_libibverbs_serve_and_fetch_fall_back_to_tcp_and_say_it_once(swarm, monkeypatch, tmp_path):
    monkeypatch.setenv("DRUN_IBVERBS_LIBRARY", NO_LIBRARY)  # servers and the fetch inherit it
    seeds = [swarm.serve(extra=["--rdma"]) for _ in range(2)]
    r = swarm.fetch(*(s.addr for s in seeds), extra=["--rdma", "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    # Every time RDMA is asked for, what it gives up; once per process, that it is not there.
    assert "WARNING: --rdma: piece bytes cross the RDMA fabric unencrypted" in r.err, r
    assert r.err.count("RDMA is not available") == 1, r.err
    assert f"cannot load {NO_LIBRARY}" in r.err and "peers are fetched from over TCP+TLS" in r.err, r.err
    pieces = 0
    for s in seeds:
        s.stop()
        assert "RDMA is not available" in s.err and "peers are served over TCP+TLS" in s.err, s.err
        m = re.search(r"(\d+) pieces over RDMA on (\d+) connections", s.out)
        assert m and m.groups() == ("0", "0"), s.out
        pieces += int(re.search(r"(\d+) pieces \(", s.out).group(1))
    assert pieces == N


def test_this_hosts_own_libibverbs_without_a_device(swarm, drun_bench, tmp_path):
    reason = rdma_unavailable_reason(drun_bench, swarm.pki)
    if reason is None:
        pytest.skip("this host has an RDMA device: the device tests below cover it")
    seed = swarm.serve(extra=["--rdma"])
    r = swarm.fetch(seed.addr, extra=["--rdma", "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert r.err.count(f"RDMA is not available ({reason})") == 1, r.err
    seed.stop()


def test_a_client_asking_for_rdma_from_a_server_that_offers_none_says_nothing(swarm, tmp_path):
    seed = swarm.serve()
    r = swarm.fetch(seed.addr, extra=["--rdma"]).ok()
    # Only the host's own unavailability (if any) is reported, never a peer that does not offer it.
    assert "RDMA to" not in r.err, r.err
    assert seed.stop()["pieces"] == N


def test_rdma_flags_are_checked(swarm, drun, tmp_path):
    swarm.fetch("127.0.0.1:1", extra=["--rdma", "--rdma-qps", "0"]).fails(2, "--rdma-qps must be between 1 and 16")
    swarm.fetch("127.0.0.1:1", extra=["--rdma-device", "mlx5_0"]).fails(2, "--rdma-device needs --rdma")
    swarm.fetch("127.0.0.1:1", extra=["--rdma", "--rdma-port", "300"]).fails(2, "--rdma-port must be between 1 and 255")
    r = drun("serve", "--store", tmp_path / "s", "--key-source", swarm.ks, "--listen", "127.0.0.1:0",
             "--tls-cert", swarm.server_cert, "--tls-key", swarm.server_key, "--client-ca", swarm.pki.ca,
             "--rdma-gid-index", "1")
    r.fails(2, "--rdma-gid-index needs --rdma")


def start_bench_server(drun_bench, pki, kind, server_args, env):
    """A drun-bench server listening: (process, port, what it printed so far). It binds port 0 on
    loopback and names the port the kernel gave it, so no other process can take that port between
    a choice and the bind (a port picked beforehand was, once, on a busy CI machine)."""
    server = subprocess.Popen([drun_bench, kind, "--server", "--bind", "127.0.0.1", "--port", "0",
                               *tls_args(pki, "bench-server"), *map(str, server_args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    said, deadline = "", time.time() + 10
    while time.time() < deadline:
        line = server.stderr.readline()
        said += line
        if not line or "waiting for a client" in line:
            break
    listening = re.search(r"waiting for a client on port (\d+)", said)
    if listening:
        return server, int(listening.group(1)), said
    server.kill()
    server.wait()
    raise AssertionError(f"drun-bench {kind} --server did not listen: {said}")


def run_bench_pair(drun_bench, pki, kind, *client_args, server_args=(), env=None):
    server, port, said = start_bench_server(drun_bench, pki, kind, server_args, env)
    try:
        client = bench(drun_bench, kind, "--client", "127.0.0.1", "--port", port, *tls_args(pki, "bench-client"),
                       *client_args, env=env)
        out, err = server.communicate(timeout=30)
        return client, server.returncode, said + err
    finally:
        if server.poll() is None:
            server.kill()


def test_drun_bench_tcp_reports_like_ib_write_bw(drun_bench, tmp_path):
    pki = PKI(tmp_path / "pki")
    client, server_rc, server_err = run_bench_pair(drun_bench, pki, "tcp", "--size", "1M", "--iters", "50")
    assert client.returncode == 0 and server_rc == 0, (client.stderr, server_err)
    lines = client.stdout.splitlines()
    assert lines[0] == "-" * 87 and lines[-1] == "-" * 87, client.stdout
    assert REPORT_HEADER.format(u="MB/sec") in lines, client.stdout
    row = lines[lines.index(REPORT_HEADER.format(u="MB/sec")) + 1].split()
    assert row[0] == "1048576" and row[1] == "50", row
    peak, average, rate = map(float, row[2:5])
    assert peak >= average > 0 and rate > 0, row
    # MsgRate is messages a second in millions: times the message size it is the average bandwidth.
    assert abs(rate * 1e6 * 1048576 / (1 << 20) - average) < average * 0.01 + 0.1, row
    assert "TLSv1.3" in client.stdout, client.stdout
    assert "sent 50 messages of 1048576 bytes over tcp+tls" in server_err

    client, _, _ = run_bench_pair(drun_bench, pki, "tcp", "--size", "64K", "--iters", "20", "--report-gbits", "--json")
    assert client.returncode == 0, client.stderr
    j = json.loads(client.stdout)
    assert j["transport"] == "tcp+tls" and j["units"] == "Gb/sec" and j["bytes"] == 65536 and j["iterations"] == 20
    assert j["bw_peak"] >= j["bw_average"] > 0 and j["msg_rate_mpps"] > 0


def test_drun_bench_refuses_what_it_cannot_do(drun_bench, tmp_path):
    pki = PKI(tmp_path / "pki")
    r = bench(drun_bench, "tcp", "--server")
    assert r.returncode == 2 and "--cert is required" in r.stderr, r.stderr
    r = bench(drun_bench, "udp", "--server")
    assert r.returncode == 2 and 'unknown transport "udp"' in r.stderr
    r = bench(drun_bench, "tcp", "--server", "--client", "x", *tls_args(pki, "a"))
    assert r.returncode == 2 and "give --server or --client HOST" in r.stderr
    r = bench(drun_bench, "tcp", "--client", "x", "--qps", "2", *tls_args(pki, "b"))
    assert r.returncode == 2 and "--qps is for rdma" in r.stderr
    r = bench(drun_bench, "tcp", "--client", "x", "--size", "0", *tls_args(pki, "c"))
    assert r.returncode == 2 and "--size must be between 1 and" in r.stderr
    env = dict(os.environ, DRUN_IBVERBS_LIBRARY=NO_LIBRARY)
    r = bench(drun_bench, "rdma", "--server", *tls_args(pki, "d"), env=env)
    assert r.returncode == 2 and f"RDMA is not available here: cannot load {NO_LIBRARY}" in r.stderr, r.stderr


# --- between two processes, over the stand-in libibverbs --------------------------------------------


@pytest.fixture
def fake_ibverbs(monkeypatch):
    p = os.environ.get("DRUN_FAKE_IBVERBS")
    if not p or not os.path.exists(p):
        if os.environ.get("DRUN_REQUIRE_BIN") == "1":
            pytest.fail(f"DRUN_FAKE_IBVERBS={p!r} is not built (tests/fake_provider)")
        pytest.skip("DRUN_FAKE_IBVERBS is not set (the stand-in libibverbs is built with the tests)")
    monkeypatch.setenv("DRUN_IBVERBS_LIBRARY", p)  # servers, fetches and benches inherit it
    return p


def rdma_counts(seed):
    m = re.search(r"(\d+) pieces over RDMA on (\d+) connections", seed.out)
    assert m, seed.out
    return int(m.group(1)), int(m.group(2))


def test_two_processes_move_every_piece_over_rdma(swarm, fake_ibverbs, tmp_path):
    seed = swarm.serve(extra=["--rdma", "--rdma-qps", "3"])
    r = swarm.fetch(seed.addr, extra=["--rdma", "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert "not available" not in r.err and "RDMA to" not in r.err, r.err
    seed.stop()
    pieces, connections = rdma_counts(seed)
    # Connections are pooled and reused: a slow run (sanitizers, a loaded host) may open one or
    # two beyond the pool, never one per piece.
    assert pieces == N and 1 <= connections <= N // 2, seed.out
    assert "RDMA with" not in seed.err, seed.err


def test_a_seed_killed_during_rdma_transfers_is_replaced_by_the_origin(swarm, fake_ibverbs, tmp_path):
    err = fetch_while_the_seed_is_killed(swarm, tmp_path, serve_extra=["--rdma"], fetch_extra=["--rdma"])
    # Almost always the kill lands while slices are on the way (the serve is slowed to 1 MiB/s):
    # the fetch then says RDMA ended for that peer, and why.
    for line in re.findall(r"RDMA to peer .* ended \((.*)\); its pieces continue over TCP\+TLS", err):
        assert "control channel closed" in line or "no completion" in line or "retry" in line, line


def test_drun_bench_rdma_between_two_processes(drun_bench, fake_ibverbs, tmp_path):
    pki = PKI(tmp_path / "pki")
    client, server_rc, server_err = run_bench_pair(drun_bench, pki, "rdma", "--size", "1M", "--iters", "100",
                                                   "--qps", "2")
    assert client.returncode == 0 and server_rc == 0, (client.stderr, server_err)
    lines = client.stdout.splitlines()
    assert "RDMA_Write BW Test (drun peer transport)" in client.stdout and " Connection type : RC" in client.stdout
    row = lines[lines.index(REPORT_HEADER.format(u="MB/sec")) + 1].split()
    assert row[:2] == ["1048576", "100"] and float(row[2]) >= float(row[3]) > 0, row
    assert "Device         : fakeib0 port 1 (GID index 0)" in client.stdout, client.stdout
    assert "sent 100 messages of 1048576 bytes over rdma" in server_err, server_err


# --- with an RDMA device ------------------------------------------------------------------------


@pytest.fixture
def rdma_device(drun_bench, tmp_path):
    reason = rdma_unavailable_reason(drun_bench, PKI(tmp_path / "probe-pki"))
    if reason is not None:
        pytest.skip(f"no RDMA device here ({reason}); on RDMA hardware, or with soft-RoCE "
                    "(modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IF), these tests run")
    return os.environ.get("RDMA_DEVICE", "")


def test_device_fetch_moves_every_piece_over_rdma(swarm, rdma_device, tmp_path):
    dev = ["--rdma-device", rdma_device] if rdma_device else []
    seed = swarm.serve(extra=["--rdma", *dev])
    r = swarm.fetch(seed.addr, extra=["--rdma", *dev, "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert "RDMA to" not in r.err and "not available" not in r.err, r.err
    seed.stop()
    m = re.search(r"(\d+) pieces over RDMA on (\d+) connections", seed.out)
    assert m and int(m.group(1)) == N and int(m.group(2)) >= 1, seed.out


def test_device_bench_rdma_reports_like_ib_write_bw(drun_bench, rdma_device, tmp_path):
    pki = PKI(tmp_path / "pki")
    dev = ["--device", rdma_device] if rdma_device else []
    client, server_rc, server_err = run_bench_pair(drun_bench, pki, "rdma", "--size", "1M", "--iters", "200",
                                                   "--qps", "2", *dev, server_args=dev)
    assert client.returncode == 0 and server_rc == 0, (client.stderr, server_err)
    assert REPORT_HEADER.format(u="MB/sec") in client.stdout.splitlines(), client.stdout
    assert "RDMA_Write BW Test" in client.stdout and "over rdma" in server_err
