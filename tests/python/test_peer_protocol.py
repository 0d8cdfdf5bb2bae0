"""The peer protocol (docs/peer-protocol.md) attacked from the outside: a real `drun serve` on
loopback over a store seeded with a small signed model, and a raw Python TLS 1.3 client that
speaks the frames by hand (standard library only).

Every test ends by checking that the server still serves a well-behaved client (a full GET_PIECE
round trip with the right bytes) and, where meaningful, the statistics `drun serve` prints when it
stops. Note that Serve's readiness probe is a bare TCP connection closed at once, so every server
has one refused handshake and one connection before the test starts.

Run:  cd tests/python && DRUN_BIN=/path/to/drun /usr/bin/python3 -m pytest -q test_peer_protocol.py
"""

import hashlib
import json
import os
import re
import resource
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from peerkit import PKI, Serve, seeded_store, signed_model
from peerwire import (
    MiB, HELLO, GET_BUNDLE, GET_HAVE, GET_PIECE, RDMA_SETUP, WELCOME, BODY, DATA, ERROR, BAD_REQUEST,
    UNSUPPORTED_VERSION, UNAUTHENTICATED, DENIED, NOT_FOUND, RDMA_UNAVAILABLE, PROBE_REFUSALS,
    Client, Closed, PeerError, rss_mib, threads, wait_until)


# ------------------------------------------------------------------------------------------------
# the module runs only once drun has a `serve` command


@pytest.fixture(scope="module", autouse=True)
def _serve_command_exists(drun_bin):
    p = subprocess.run([drun_bin, "serve"], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if p.returncode == 2 and b"unknown command" in p.stderr.lower():
        pytest.skip(f"{drun_bin} has no `serve` command yet (the peer server is not built in)")



def bits_set(bits, count):
    return [i for i in range(count) if bits[i // 8] & (0x80 >> (i % 8))]


def handshake_fails(connect_and_hello):
    """Runs a connect + HELLO + read; asserts it fails with a TLS error, a reset or EOF (not a
    timeout, and not a WELCOME). Returns what failed."""
    try:
        got = connect_and_hello()
    except TimeoutError:
        pytest.fail("the server neither refused nor answered the connection (timed out)")
    except (ssl.SSLError, ConnectionError, Closed, EOFError) as e:
        return e
    except OSError as e:  # e.g. EPIPE surfaced otherwise
        return e
    pytest.fail(f"the connection was served: {got!r}")


# ------------------------------------------------------------------------------------------------
# the world: a signed model in a store, a PKI, and `drun serve` factories


class World:
    pass


@pytest.fixture
def world(drun, drun_bin, drun_keys, tmp_path):
    priv, pub = drun_keys["ed25519"]
    w = World()
    w.bin = drun_bin
    w.model, w.sig, w.artifact = signed_model(drun, tmp_path / "model", priv)
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    w.key_source = f"file:{tmp_path / 'node.key'}"
    w.store = tmp_path / "store"
    seeded_store(drun, w.store, w.key_source, w.model, w.sig, pub)

    # The piece map comes from the manifest, not from assumptions.
    man = json.loads(drun("manifest", "--json", w.sig).ok().out)
    assert man["artifact_id"] == w.artifact
    ps = man["shard_size"]
    assert ps == MiB, man
    assert [f["name"] for f in man["files"]] == ["config.json", "weights.bin"], man["files"]
    w.pieces = []  # global piece index -> (file index, expected bytes)
    for fi, f in enumerate(man["files"]):
        data = (w.model / f["name"]).read_bytes()
        assert len(data) == f["size"]
        for k in range(f["pieces"]):
            w.pieces.append((fi, data[k * ps:(k + 1) * ps]))
    assert len(w.pieces) == man["piece_count"] == 4, man
    assert [fi for fi, _ in w.pieces] == [0, 1, 1, 1]
    w.bundle = Path(w.sig).read_bytes()

    w.pki = PKI(tmp_path / "pki")
    w.server_cert, w.server_key = w.pki.issue("server")
    w.client_cert, w.client_key = w.pki.issue("client", uri="spiffe://drun.test/client")
    w.tmp = tmp_path
    w.servers = []
    yield w
    for s in w.servers:
        if s.proc.poll() is None:
            s.kill()


def serve(w, *extra):
    srv = Serve(w.bin, w.store, w.key_source, w.server_cert, w.server_key, w.pki.ca, extra=extra)
    w.servers.append(srv)
    return srv


def client(w, srv, **kw):
    kw.setdefault("cert", w.client_cert)
    kw.setdefault("key", w.client_key)
    return Client(srv.port, w.pki.ca, **kw)


def check_piece(w, c, index):
    fi, expected = w.pieces[index]
    got = c.get_piece(w.artifact, fi, index)
    assert len(got) == len(expected), f"piece {index}: {len(got)} bytes, expected {len(expected)}"
    assert got == expected, f"piece {index}: wrong bytes"


def assert_serves(w, srv, pieces=(0, 3)):
    """A fresh, well-behaved client: HELLO -> WELCOME, then GET_PIECE with the right bytes."""
    with client(w, srv) as c:
        c.welcome()
        for i in pieces:
            check_piece(w, c, i)


def stop(srv):
    st = srv.stop()
    assert st, f"drun serve printed no statistics line\n--- stdout ---\n{srv.out}\n--- stderr ---\n{srv.err}"
    assert srv.proc.returncode == 0, f"drun serve exited with {srv.proc.returncode}: {srv.err}"
    return st


# ------------------------------------------------------------------------------------------------
# 1. happy path


def test_happy_path_hello_have_pieces_bundle(world):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.welcome()
        count, bits = c.get_have(w.artifact)
        assert count == len(w.pieces) == 4
        assert bits_set(bits, count) == [0, 1, 2, 3], bits.hex()
        for i in range(len(w.pieces)):
            check_piece(w, c, i)
        assert c.get_bundle(w.artifact) == w.bundle
        # still in order on the same connection
        check_piece(w, c, 2)
    assert_serves(w, srv)
    st = stop(srv)
    assert st["pieces"] == 5 + 2, st
    assert st["requests"] == 2 + 5 + 2, st  # have + 5 pieces + bundle, then 2 pieces
    assert st["protocol_errors"] == 0 and st["busy"] == 0 and st["denied"] == 0, st
    assert st["handshakes_refused"] == PROBE_REFUSALS, st
    assert st["connections"] == PROBE_REFUSALS + 2, st


# ------------------------------------------------------------------------------------------------
# 2. who may connect


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_client_without_a_trusted_certificate_is_refused(world, who):
    w = world
    cert = key = None
    if who == "another CA":
        other = PKI(w.tmp / "other-pki", name="some other CA")
        # Same names as the good client, signed by a CA the server does not trust.
        cert, key = other.issue("client", uri="spiffe://drun.test/client")
    srv = serve(w)

    def attempt():
        with client(w, srv, cert=cert, key=key) as c:
            c.hello()
            return c.read_frame()

    handshake_fails(attempt)
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] >= PROBE_REFUSALS + 1, st
    assert st["requests"] == 2, st


def test_tls12_client_is_refused(world):
    w = world
    srv = serve(w)

    def attempt():
        with client(w, srv, tls_max=ssl.TLSVersion.TLSv1_2) as c:
            c.hello()
            return c.read_frame()

    handshake_fails(attempt)
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] >= PROBE_REFUSALS + 1, st


# ------------------------------------------------------------------------------------------------
# 3. malformed frames


def test_hello_with_wrong_magic(world):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.hello(magic=b"DRUM")
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    # a refused HELLO is counted as a refused handshake (include/drun/peer.hpp)
    assert st["handshakes_refused"] + st["protocol_errors"] >= PROBE_REFUSALS + 1, st


def test_hello_with_version_3(world):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.hello(version=3)
        msg = c.expect_error(UNSUPPORTED_VERSION)
        assert re.search(r"versions 1 to 2\b", msg), \
            f"the refusal does not name the server's versions 1 to 2: {msg!r}"
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] + st["protocol_errors"] >= PROBE_REFUSALS + 1, st


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_hello_version_2_carries_a_trace_context(world):
    """Version 2 adds the caller's traceparent; version 1 (no trace) is still spoken."""
    w = world
    srv = serve(w)
    for tp in (TRACEPARENT, b""):
        with client(w, srv) as c:
            c.welcome(version=2, traceparent=tp)
            count, _ = c.get_have(w.artifact)
            assert count > 0
    with client(w, srv) as c:
        c.welcome(version=1)
    stop(srv)


@pytest.mark.parametrize("name,body", [
    ("traceparent_not_hex", b"00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01"),
    ("traceparent_upper_case", TRACEPARENT.upper()),
    ("trace_id_all_zero", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01"),
    ("version_ff", b"ff" + TRACEPARENT[2:]),
])
def test_hello_with_a_malformed_traceparent_is_refused(world, name, body):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.hello(version=2, traceparent=body)
        msg = c.expect_error(BAD_REQUEST)
        assert "traceparent" in msg, msg
        c.expect_closed()
    assert_serves(w, srv)
    stop(srv)


@pytest.mark.parametrize("length", [1, 54, 56, 255])
def test_hello_with_a_traceparent_of_the_wrong_length_is_refused(world, length):
    """The length byte says 0 or 55; anything else (even with that many bytes following) is a bad HELLO."""
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.send_frame(HELLO, b"DRUN" + struct.pack(">HHB", 2, 0, length) + b"a" * length)
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    stop(srv)


def test_request_before_hello(world):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.send_frame(GET_HAVE, bytes.fromhex(w.artifact))
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] + st["protocol_errors"] >= PROBE_REFUSALS + 1, st
    assert st["pieces"] == 2, st


def test_hello_too_long_is_refused_before_reading_it(world):
    """A HELLO announcing more than 8 + 8192 + 56 bytes: refused from the header alone."""
    w = world
    srv = serve(w)
    with client(w, srv, timeout=5) as c:
        c.send_raw(struct.pack(">BI", HELLO, 8 + 8192 + 56 + 1))
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] + st["protocol_errors"] >= PROBE_REFUSALS + 1, st


# after WELCOME: (name, raw bytes to send). Each sends exactly what the server reads, so that
# closing leaves nothing unread (which would turn the close into a reset).
def _after_welcome_cases():
    aid = b"\x11" * 32  # the body's content does not matter for these
    return {
        "unknown_type_0x7f": struct.pack(">BI", 0x7F, 0),
        "server_type_0x81_from_client": struct.pack(">BI", WELCOME, 4) + b"\x00\x01\x00\x00",
        "hello_again": struct.pack(">BI", HELLO, 8) + b"DRUN\x00\x01\x00\x00",
        "get_piece_body_too_short": struct.pack(">BI", GET_PIECE, 36) + aid + b"\x00\x00\x00\x01",
        "get_piece_body_32": struct.pack(">BI", GET_PIECE, 32) + aid,
        "get_have_body_31": struct.pack(">BI", GET_HAVE, 31) + aid[:31],
        "get_bundle_empty": struct.pack(">BI", GET_BUNDLE, 0),
    }


@pytest.mark.parametrize("case", sorted(_after_welcome_cases()))
def test_malformed_frame_after_welcome(world, case):
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.welcome()
        check_piece(w, c, 1)
        c.send_raw(_after_welcome_cases()[case])
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    assert st["protocol_errors"] >= 1, st


@pytest.mark.parametrize("ftype,length", [(GET_PIECE, 0x7FFFFFFF), (GET_PIECE, 41), (DATA, 0xFFFFFFFF),
                                          (GET_BUNDLE, 0x7FFFFFFF), (0x7F, 0xFFFFFFFF)])
def test_oversized_frame_is_refused_from_its_header(world, ftype, length):
    """Only the 5-byte header is sent: the server must answer at once (it cannot be waiting for
    the body) and must not have allocated the announced length."""
    w = world
    srv = serve(w)
    with client(w, srv, timeout=5) as c:
        c.welcome()
        t0 = time.monotonic()
        c.send_raw(struct.pack(">BI", ftype, length))
        c.expect_error(BAD_REQUEST)
        c.expect_closed(within=5)
        assert time.monotonic() - t0 < 4, "the server waited before refusing the header"
    hwm = rss_mib(srv.proc.pid, "VmHWM")
    assert hwm < 200, f"server peak RSS {hwm:.0f} MiB after a {length}-byte frame header"
    assert_serves(w, srv)
    st = stop(srv)
    assert st["protocol_errors"] >= 1, st


# ------------------------------------------------------------------------------------------------
# 4. requests for what is not there


def test_not_found_keeps_the_connection(world):
    w = world
    srv = serve(w)
    unknown = os.urandom(32).hex()
    with client(w, srv) as c:
        c.welcome()
        for fi, pi in [(1, 4), (1, 0xFFFFFFFF), (0, 1), (1, 0), (2, 1), (0xFFFFFFFF, 0)]:
            with pytest.raises(PeerError) as e:
                c.get_piece(w.artifact, fi, pi)
            assert e.value.code == NOT_FOUND, f"file {fi} piece {pi}: {e.value}"
            check_piece(w, c, 2)  # same connection, still usable
        for req in (lambda: c.get_piece(unknown, 1, 1), lambda: c.get_have(unknown),
                    lambda: c.get_bundle(unknown)):
            with pytest.raises(PeerError) as e:
                req()
            assert e.value.code == NOT_FOUND, f"unknown artifact: {e.value}"
            check_piece(w, c, 0)
        assert c.get_bundle(w.artifact) == w.bundle
    assert_serves(w, srv)
    st = stop(srv)
    assert st["protocol_errors"] == 0 and st["denied"] == 0, st
    assert st["pieces"] == 6 + 3 + 2, st


def test_rdma_setup_to_a_server_without_rdma_is_refused_and_the_connection_goes_on(world, monkeypatch):
    """A server that offers no RDMA (none asked, or none on this host) answers RDMA_SETUP with
    rdma_unavailable, whatever its body, and keeps serving the connection over TCP+TLS."""
    w = world
    monkeypatch.setenv("DRUN_IBVERBS_LIBRARY", "/nonexistent/libibverbs.so.1")
    for extra in ((), ("--rdma",)):
        srv = serve(w, *extra)
        with client(w, srv) as c:
            c.welcome(features=0)  # no device here: not offered even with --rdma
            for body in (b"", b"\x00" * 168, os.urandom(40)):
                c.send_frame(RDMA_SETUP, body)
                assert "offers no RDMA" in c.expect_error(RDMA_UNAVAILABLE)
                check_piece(w, c, 1)
            c.send_frame(RDMA_SETUP, b"\x00" * 169)  # over the frame's bound: refused from its header
            c.expect_error(BAD_REQUEST)
            c.expect_closed()
        assert_serves(w, srv)
        st = stop(srv)
        assert st["protocol_errors"] == 1 and st["pieces"] == 3 + 2, st


# ------------------------------------------------------------------------------------------------
# 5. silent connections


def test_silent_connections_do_not_block_others(world):
    w = world
    srv = serve(w)
    pid = srv.proc.pid
    assert_serves(w, srv)
    base = threads(pid)
    # From three other hosts (loopback addresses), fewer than an address's share of handshakes each.
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    silent_tcp = [socket.create_connection(("127.0.0.1", srv.port), timeout=5, source_address=(hosts[k % 3], 0))
                  for k in range(20)]
    silent_tls = [client(w, srv, source=hosts[k % 3]) for k in range(20)]  # TLS done, no HELLO
    half_hello = []
    for k in range(5):  # a HELLO header announcing 12 bytes, then 3 of them, then silence
        c = client(w, srv, source=hosts[k % 3])
        c.send_raw(struct.pack(">BI", HELLO, 12) + b"DRU")
        half_hello.append(c)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        assert_serves(w, srv, pieces=(0, 1, 2, 3))
        took = time.monotonic() - t0
        assert took < 3, f"a well-behaved client took {took:.1f} s beside 45 silent connections"
        n, rss = threads(pid), rss_mib(pid)
        assert n <= base + 45 + 8, f"{n} server threads for 45 silent connections (baseline {base})"
        assert rss < 200, f"server RSS {rss:.0f} MiB with 45 silent connections"
    finally:
        for s in silent_tcp:
            s.close()
        for c in silent_tls + half_hello:
            c.close()
    # the threads of closed connections end
    assert wait_until(lambda: threads(pid) <= base + 2, 5), \
        f"{threads(pid)} server threads 5 s after the silent connections closed (baseline {base})"
    assert_serves(w, srv)
    st = stop(srv)
    assert st["busy"] == 0, st
    assert st["connections"] >= PROBE_REFUSALS + 45 + 2, st


def test_silent_connections_are_closed_by_the_handshake_timeout(world):
    """The handshake timeout (TLS + HELLO) is 10 s: a caller that stays silent is closed then."""
    w = world
    srv = serve(w)
    pid = srv.proc.pid
    base = threads(pid)
    t0 = time.monotonic()
    tcp = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    tls = client(w, srv, timeout=20)
    half = client(w, srv, timeout=20)
    half.send_raw(struct.pack(">BI", HELLO, 12) + b"DRU")
    try:
        assert_serves(w, srv)
        # raw TCP: EOF or reset
        tcp.settimeout(20)
        try:
            assert tcp.recv(1) == b"", "the server sent bytes to a silent TCP caller"
        except ConnectionError:
            pass
        except TimeoutError:
            pytest.fail("a silent TCP connection was still open 20 s after it was made")
        for c in (tls, half):
            try:
                ftype, body = c.read_frame()
                # an ERROR before closing is fine; anything else is not
                assert ftype == ERROR, f"frame 0x{ftype:02x} to a silent caller"
                c.expect_closed(within=5)
            except (Closed, ssl.SSLError, ConnectionError):
                pass
            except TimeoutError:
                pytest.fail("a silent connection was still open 20 s after it was made")
        took = time.monotonic() - t0
        assert 8 <= took <= 16, f"silent connections closed after {took:.1f} s (handshake timeout 10 s)"
    finally:
        tcp.close()
        tls.close()
        half.close()
    assert wait_until(lambda: threads(pid) <= base + 1, 5), threads(pid)
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] >= PROBE_REFUSALS + 3, st


def test_idle_timeout_closes_idle_and_slow_request_connections(world):
    w = world
    srv = serve(w, "--idle-timeout", "2")
    idle = client(w, srv, timeout=10).welcome()
    slow = client(w, srv, timeout=10).welcome()
    # a slow-loris request: the header and 10 of 40 body bytes, then nothing
    slow.send_raw(struct.pack(">BI", GET_PIECE, 40) + b"\x00" * 10)
    t0 = time.monotonic()
    try:
        assert_serves(w, srv)
        for name, c in (("idle", idle), ("slow request", slow)):
            try:
                ftype, body = c.read_frame()
                assert ftype == ERROR, f"{name}: frame 0x{ftype:02x}"
                c.expect_closed(within=5)
            except (Closed, ssl.SSLError, ConnectionError):
                pass
            except TimeoutError:
                pytest.fail(f"{name} connection still open {time.monotonic() - t0:.1f} s in (--idle-timeout 2)")
        took = time.monotonic() - t0
        assert 1.5 <= took <= 6, f"closed after {took:.1f} s with --idle-timeout 2"
    finally:
        idle.close()
        slow.close()
    assert_serves(w, srv)
    stop(srv)


# ------------------------------------------------------------------------------------------------
# 6. many concurrent clients


def test_64_concurrent_clients(world):
    w = world
    srv = serve(w)
    pid = srv.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    n = 64
    barrier = threading.Barrier(n)
    errors, done = [], []
    peak = [0.0]
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            try:
                peak[0] = max(peak[0], rss_mib(pid))
            except (OSError, KeyError):
                pass
            time.sleep(0.02)

    def one(k):
        try:
            # 64 callers on 8 hosts (loopback addresses): within every address's share of handshakes.
            with client(w, srv, timeout=60, source=f"127.0.0.{1 + k % 8}") as c:
                c.welcome()
                barrier.wait(timeout=60)
                for j in range(3):
                    check_piece(w, c, 1 + (k + j) % 3)
            done.append(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"client {k}: {type(e).__name__}: {e}")
            barrier.abort()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ts = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=180)
    stop_sampling.set()
    sampler.join()
    assert not any(t.is_alive() for t in ts), "some clients did not finish within 180 s"
    assert not errors, "\n".join(errors[:10])
    assert len(done) == n
    hwm = rss_mib(pid, "VmHWM")
    assert max(peak[0], hwm) < 400, f"server RSS peaked at {max(peak[0], hwm):.0f} MiB with {n} clients"
    assert_serves(w, srv)
    st = stop(srv)
    assert st["pieces"] == 3 * n + 2, st
    assert st["protocol_errors"] == 0 and st["busy"] == 0, st


# ------------------------------------------------------------------------------------------------
# 7. --max-connections


def test_max_connections_refuses_the_fifth(world):
    w = world
    srv = serve(w, "--max-connections", "4")
    time.sleep(0.5)  # let the readiness probe's connection end
    held = [client(w, srv).welcome() for _ in range(4)]
    try:
        def attempt():
            with client(w, srv, timeout=5) as c:
                c.hello()
                return c.read_frame()

        t0 = time.monotonic()
        e = handshake_fails(attempt)
        took = time.monotonic() - t0
        assert took < 3, f"the 5th connection was refused only after {took:.1f} s ({e!r})"
        # the 4 held connections still work
        for c in held:
            check_piece(w, c, 3)
    finally:
        for c in held:
            c.close()

    # once they are closed, a new caller is served again
    def served():
        try:
            assert_serves(w, srv)
            return True
        except (OSError, Closed):
            return False

    assert wait_until(served, 5, step=0.2), "no caller served after the 4 held connections closed"
    st = stop(srv)
    assert st["busy"] >= 1, st


# ------------------------------------------------------------------------------------------------
# 8. tokens


def test_token_without_jwks_is_unauthenticated(world):
    w = world
    srv = serve(w)
    token = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5IiwiYXVkIjoiZHJ1biJ9.c2lnbmF0dXJl"
    with client(w, srv) as c:
        c.hello(token=token)
        c.expect_error(UNAUTHENTICATED)
        c.expect_closed()
    # a token that is not even a JWT: the same answer
    with client(w, srv) as c:
        c.hello(token=b"\xff" * 100)
        c.expect_error(UNAUTHENTICATED)
        c.expect_closed()
    assert_serves(w, srv)
    st = stop(srv)
    assert st["handshakes_refused"] >= PROBE_REFUSALS + 2, st
    assert st["requests"] == 2, st


def test_hello_token_length_beyond_body_is_bad_request(world):
    """HELLO whose token length says more than the body holds: bad_request, never a read past."""
    w = world
    srv = serve(w)
    with client(w, srv) as c:
        c.send_frame(HELLO, b"DRUN" + struct.pack(">HH", 1, 500) + b"x" * 10)
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    with client(w, srv) as c:  # trailing bytes after the token
        c.send_frame(HELLO, b"DRUN" + struct.pack(">HH", 1, 0) + b"junk")
        c.expect_error(BAD_REQUEST)
        c.expect_closed()
    assert_serves(w, srv)
    stop(srv)


# ------------------------------------------------------------------------------------------------
# a caller that stops reading a large piece (security review, finding 3)


def test_a_caller_that_stops_reading_a_1_gib_piece_does_not_starve_the_others(drun, drun_bin, drun_keys, tmp_path):
    """Client A asks for a 1 GiB piece (the reference tool's default shard) and never reads it.
    Large pieces stream through 1 MiB buffers: A holds 1 MiB, not 1 GiB of the server's 256 MiB
    budget, so client B is served at once; then B reads the whole 1 GiB piece, right bytes."""
    priv, pub = drun_keys["ed25519"]
    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"layers": 80}')
    with open(model / "weights.bin", "wb") as f:
        f.truncate(1 << 30)  # sparse: zeros, cheap to make and to read
    sig = tmp_path / "big.sig"
    drun("sign", model, "--key", priv, "--piece-size", 1 << 30, "--signature", sig).ok()
    man = json.loads(drun("manifest", "--json", sig).ok().out)
    artifact = man["artifact_id"]
    assert [f["name"] for f in man["files"]] == ["config.json", "weights.bin"], man["files"]
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    ks = f"file:{tmp_path / 'node.key'}"
    seeded_store(drun, tmp_path / "store", ks, model, sig, pub)
    pki = PKI(tmp_path / "pki")
    server_cert, server_key = pki.issue("server")
    a_cert, a_key = pki.issue("reader-a", uri="spiffe://drun.test/a")
    b_cert, b_key = pki.issue("reader-b", uri="spiffe://drun.test/b")
    srv = Serve(drun_bin, tmp_path / "store", ks, server_cert, server_key, pki.ca)
    try:
        a = Client(srv.port, pki.ca, cert=a_cert, key=a_key)
        a.welcome()
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a.send_frame(GET_PIECE, bytes.fromhex(artifact) + struct.pack(">II", 1, 1))
        time.sleep(2.0)  # the server authenticates the piece, starts sending, and A's window fills
        assert rss_mib(srv.proc.pid) < 200, f"the server holds {rss_mib(srv.proc.pid):.0f} MiB for A"
        with Client(srv.port, pki.ca, cert=b_cert, key=b_key) as b:
            b.welcome()
            start = time.monotonic()
            assert b.get_piece(artifact, 0, 0) == b'{"layers": 80}'
            took = time.monotonic() - start
            assert took < 2.0, f"B waited {took:.1f} s for a 14-byte piece while A held a 1 GiB one"
            # The streamed answer itself: BODY announces 1 GiB, DATA frames bring exactly that.
            b.send_frame(GET_PIECE, bytes.fromhex(artifact) + struct.pack(">II", 1, 1))
            ftype, body = b.read_frame()
            assert ftype == BODY and struct.unpack(">Q", body)[0] == 1 << 30, (ftype, body)
            h, got = hashlib.sha256(), 0
            while got < 1 << 30:
                ftype, chunk = b.read_frame()
                assert ftype == DATA and 1 <= len(chunk) <= MiB, (ftype, len(chunk))
                h.update(chunk)
                got += len(chunk)
            assert got == 1 << 30
            zeros, want = bytes(MiB), hashlib.sha256()
            for _ in range(1024):
                want.update(zeros)
            assert h.hexdigest() == want.hexdigest()
        a.close()
    finally:
        st = stop(srv)
    assert st["pieces"] == 2, st  # B's two; A's answer never completed


def read_chars(pid):
    """Bytes the process has read through read(2) and friends (/proc/PID/io rchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def test_a_denied_request_does_not_read_the_artifacts_bundle(world, drun, drun_keys):
    """Authorization comes before the store is asked (security review, finding 7): with a policy of
    artifact ids only, a refused caller costs the server no bundle read, so a refusal takes as long
    for a held artifact as for an unknown one. Watched through the bytes the server reads: the
    held artifact's bundle is ~600 KB (4096 pieces)."""
    w = world
    priv, pub = drun_keys["ed25519"]
    big = w.tmp / "big"
    big.mkdir()
    (big / "w.bin").write_bytes(os.urandom(16 * MiB))
    sig = w.tmp / "big.sig"
    drun("sign", big, "--key", priv, "--piece-size", 4096, "--signature", sig).ok()
    assert sig.stat().st_size > 500_000, sig.stat().st_size
    held = json.loads(drun("manifest", "--json", sig).ok().out)["artifact_id"]
    seeded_store(drun, w.store, w.key_source, big, sig, pub)
    policy = w.tmp / "policy.json"
    policy.write_text(json.dumps({"roles": {"r": {"artifacts": [w.artifact]}}, "bindings": [
        {"certificate": {"uri": "spiffe://drun.test/client"}, "roles": ["r"]}]}))
    srv = serve(w, "--policy", policy)
    try:
        with client(w, srv) as c:
            c.welcome()
            check_piece(w, c, 0)  # the granted artifact is served
            before = read_chars(srv.proc.pid)
            c.send_frame(GET_HAVE, bytes.fromhex(held))
            c.expect_error(DENIED)
            c.send_frame(GET_HAVE, bytes.fromhex("ab" * 32))  # unknown: denied the same way
            c.expect_error(DENIED)
            read = read_chars(srv.proc.pid) - before
            assert read < 100_000, f"the server read {read} bytes to refuse two requests"
    finally:
        st = stop(srv)
    assert st["denied"] == 2, st
