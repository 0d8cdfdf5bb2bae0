"""Peers over mutual TLS, with real processes on loopback: `drun serve` seeds, `drun fetch`
leeches from peers (and origins), a lying peer (a Python process that frames correctly but flips
bytes) is banned, a peer killed mid-transfer is replaced, and the policy and tokens decide who may
read what."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from peerkit import PKI, Serve, free_port, seeded_store, signed_model
from peerwire import LyingPeer  # noqa: F401 (other tests import it from here)
from test_fetch import Nginx


PIECES_OF = 256 << 10
N = 13  # pieces of the swarm's model


def same_tree(a, b, skip=("model.sig",)):
    files = lambda r: {p.relative_to(r): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in r.rglob("*") if p.is_file() and p.name not in skip}
    return files(a) == files(b)


@pytest.fixture
def swarm(drun, drun_bin, drun_keys, tmp_path):
    """A PKI, a signed 3 MiB model (256 KiB pieces: 13 in all), a seed store holding it, and a node key."""
    pki = PKI(tmp_path / "pki")
    key, pub = drun_keys["ecdsa-p256"]
    model, sig, artifact = signed_model(drun, tmp_path / "model", key, piece=PIECES_OF)
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    ks = f"file:{tmp_path / 'node.key'}"
    seeded_store(drun, tmp_path / "seed", ks, model, sig, pub)

    class S:
        pass

    s = S()
    s.pki, s.model, s.sig, s.pub, s.artifact, s.ks, s.tmp = pki, model, sig, pub, artifact, ks, tmp_path
    s.client_cert, s.client_key = pki.issue("leecher", uri="spiffe://cluster/ns/ml/sa/loader")
    s.server_cert, s.server_key = pki.issue("seed", uri="spiffe://cluster/ns/ml/sa/seed")
    s.servers = []

    def serve(store=None, extra=()):
        srv = Serve(drun_bin, store or tmp_path / "seed", ks, s.server_cert, s.server_key, pki.ca, extra=extra)
        s.servers.append(srv)
        return srv

    def fetch(*peers, store="leech", extra=(), origin=None, cert=True, timeout=120):
        args = ["fetch", "--public-key", pub, "--store", tmp_path / store, "--key-source", ks, "--ca-cert", pki.ca]
        if "--artifact" not in extra:
            args += ["--signature", sig]
        if cert:
            args += ["--tls-cert", s.client_cert, "--tls-key", s.client_key]
        for p in peers:
            args += ["--peer", p]
        if origin:
            args += ["--origin", origin]
        return drun(*args, *extra, timeout=timeout)

    s.serve, s.fetch = serve, fetch
    yield s
    for srv in s.servers:
        if srv.proc.poll() is None:
            srv.kill()


def test_fetch_from_a_seed_peer_without_any_origin(swarm, tmp_path):
    seed = swarm.serve()
    r = swarm.fetch(seed.addr, extra=["--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert re.search(rf"peer {re.escape(seed.addr)}: {N} pieces, 0 rejected, 0 errors", r.out), r
    stats = seed.stop()
    assert stats["pieces"] == N and stats["denied"] == 0, stats


def test_bundle_from_a_peer_is_verified_against_our_own_trust(swarm, drun, drun_keys, tmp_path):
    seed = swarm.serve()
    r = swarm.fetch(seed.addr, extra=["--artifact", swarm.artifact, "--out", tmp_path / "out"])
    r.ok()
    assert same_tree(swarm.model, tmp_path / "out")
    # A trust store that does not include the publisher: refused, nothing fetched.
    other = drun_keys["ecdsa-p384"][1]
    r = drun("fetch", "--artifact", swarm.artifact, "--public-key", other, "--store", tmp_path / "s2",
             "--key-source", swarm.ks, "--ca-cert", swarm.pki.ca, "--tls-cert", swarm.client_cert,
             "--tls-key", swarm.client_key, "--peer", seed.addr)
    r.fails(1)
    stats = seed.stop()
    assert stats["pieces"] == N, stats  # only the first fetch's pieces


def test_client_without_a_certificate_or_from_another_ca_is_refused(swarm, tmp_path):
    seed = swarm.serve()
    swarm.fetch(seed.addr, cert=False).fails(3, seed.addr)
    other = PKI(tmp_path / "other", "another CA")
    cert, key = other.issue("stranger")
    r = swarm.fetch(seed.addr, cert=False, store="s3",
                    extra=["--tls-cert", cert, "--tls-key", key])
    r.fails(3, seed.addr)
    stats = seed.stop()
    assert stats["pieces"] == 0 and stats["handshakes_refused"] >= 2, stats


def test_fetch_dials_peers_from_the_local_address_it_is_given(swarm, tmp_path):
    seed = swarm.serve(extra=["--log-level", "info"])
    swarm.fetch(seed.addr, extra=["--local-address", "127.0.0.7"]).ok()
    # Not an IP address, not one of this host's, not of the peer's family: refused, naming it.
    swarm.fetch(seed.addr, store="s2", extra=["--local-address", "localhost"]).fails(2, "not an IP address")
    swarm.fetch(seed.addr, store="s3", extra=["--local-address", "192.0.2.1"]).fails(3, "cannot dial from 192.0.2.1")
    swarm.fetch(seed.addr, store="s4", extra=["--local-address", "::1"]).fails(3, "::1")
    seed.stop()
    closed = [line for line in seed.err.splitlines() if "connection closed" in line]
    assert closed and all("127.0.0.7" in line for line in closed), seed.err[-3000:]


def test_server_certificate_must_chain_to_our_ca(swarm, drun_bin, tmp_path):
    other = PKI(tmp_path / "other", "another CA")
    cert, key = other.issue("impostor")
    impostor = Serve(drun_bin, tmp_path / "seed", swarm.ks, cert, key, swarm.pki.ca)
    swarm.servers.append(impostor)
    swarm.fetch(impostor.addr).fails(3, "certificate")
    assert impostor.stop()["pieces"] == 0


def write_policy(path, bindings, roles):
    path.write_text(json.dumps({"roles": roles, "bindings": bindings}))
    return path


def test_policy_allows_by_spiffe_id_and_denies_others_with_exit_4(swarm, tmp_path):
    policy = write_policy(tmp_path / "policy.json",
                          [{"certificate": {"uri": "spiffe://cluster/ns/ml/sa/loader"}, "roles": ["reader"]}],
                          {"reader": {"artifacts": [swarm.artifact]}})
    seed = swarm.serve(extra=["--policy", policy])
    swarm.fetch(seed.addr, extra=["--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    # Another identity from the same CA: authenticated, but not authorized.
    cert, key = swarm.pki.issue("intruder", uri="spiffe://cluster/ns/other/sa/x")
    r = swarm.fetch(seed.addr, store="s2", cert=False, extra=["--tls-cert", cert, "--tls-key", key])
    r.fails(4, "denied", any_of=("spiffe://cluster/ns/other/sa/x",))
    stats = seed.stop()
    assert stats["denied"] >= 1 and stats["pieces"] == N, stats  # nothing went to the intruder


def test_publisher_rule_allows_what_the_publisher_signed(swarm, drun, drun_keys, tmp_path):
    policy = write_policy(tmp_path / "policy.json",
                          [{"certificate": {"uri_prefix": "spiffe://cluster/ns/ml/"}, "roles": ["ml"]}],
                          {"ml": {"publishers": [{"public_key": str(swarm.pub)}]}})
    seed = swarm.serve(extra=["--policy", policy])
    swarm.fetch(seed.addr).ok()
    seed.stop()
    other_pub = drun_keys["ecdsa-p384"][1]
    policy = write_policy(tmp_path / "policy2.json",
                          [{"certificate": {"uri_prefix": "spiffe://cluster/ns/ml/"}, "roles": ["ml"]}],
                          {"ml": {"publishers": [{"public_key": str(other_pub)}]}})
    seed = swarm.serve(extra=["--policy", policy])
    swarm.fetch(seed.addr, store="s2").fails(4)
    seed.stop()


def token(drun, tmp_path, name, *args):
    key = tmp_path / "issuer.key"
    if not key.exists():
        drun("keygen", "--type", "ed25519", "--out", key).ok()
        (tmp_path / "jwks.json").write_text(drun("token", "jwks", "--public-key", f"{key}.pub").ok().out)
    if "--bind-cert" not in args:
        args = (*args, "--unbound")
    out = drun("token", "issue", "--key", key, *args).ok().out.strip()
    path = tmp_path / name
    path.write_text(out + "\n")
    os.chmod(path, 0o600)
    return path


def test_token_only_callers(swarm, drun, tmp_path):
    good = token(drun, tmp_path, "good.jwt", "--subject", "loader", "--audience", "drun", "--artifact", swarm.artifact)
    wrong_aud = token(drun, tmp_path, "aud.jwt", "--subject", "loader", "--audience", "elsewhere", "--artifact", "*")
    other_artifact = token(drun, tmp_path, "other.jwt", "--subject", "loader", "--audience", "drun",
                           "--artifact", "0" * 64)
    seed = swarm.serve(extra=["--jwks", tmp_path / "jwks.json", "--allow-token-only"])
    swarm.fetch(seed.addr, cert=False, extra=["--token-file", good, "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    swarm.fetch(seed.addr, cert=False, store="s2", extra=["--token-file", wrong_aud]).fails(4, "audience")
    swarm.fetch(seed.addr, cert=False, store="s3", extra=["--token-file", other_artifact]).fails(4)
    r = swarm.fetch(seed.addr, cert=False, store="s4")
    r.fails((3, 4))
    stats = seed.stop()
    assert "eyJ" not in seed.out + seed.err  # tokens are never logged


def manifest_json(drun, sig):
    return json.loads(drun("manifest", "--json", sig).ok().out)


def test_a_lying_peer_is_banned_and_the_fetch_completes_from_others(swarm, drun, tmp_path):
    liar = LyingPeer(swarm.pki, swarm.model, swarm.sig, manifest_json(drun, swarm.sig))
    seed = swarm.serve()
    try:
        r = swarm.fetch(liar.addr, seed.addr, extra=["--out", tmp_path / "out"]).ok()
        assert same_tree(swarm.model, tmp_path / "out")
        line = next(l for l in r.out.splitlines() if liar.addr in l)
        # Banned at its first bad piece: only requests already in flight (at most 4) were answered.
        assert "banned" in line and re.search(r"0 pieces, [1-4] rejected", line), r
        assert 1 <= liar.served <= 4
        drun("cache", "verify", "--store", tmp_path / "leech", "--key-source", swarm.ks).ok()
        # With only the liar, nothing verifies: exit 1, and nothing unverified is stored or written.
        r = swarm.fetch(liar.addr, store="s2", extra=["--out", tmp_path / "out2"])
        r.fails(1, "digest mismatch")
        assert not (tmp_path / "out2").exists()
        drun("cache", "verify", "--store", tmp_path / "s2", "--key-source", swarm.ks).ok()
    finally:
        liar.stop()


def fetch_while_the_seed_is_killed(swarm, tmp_path, serve_extra=(), fetch_extra=()):
    """A fetch from a slowed seed and an nginx origin; the seed is SIGKILLed mid-transfer. The
    fetch must complete, with pieces from both. Returns its stderr."""
    nginx = Nginx(tmp_path, swarm.model)
    seed = swarm.serve(extra=["--limit-rate", "1M", *serve_extra])
    try:
        p = subprocess.Popen([os.environ["DRUN_BIN"], "fetch", "--signature", str(swarm.sig), "--public-key",
                              str(swarm.pub), "--store", str(tmp_path / "leech"), "--key-source", swarm.ks,
                              "--ca-cert", str(swarm.pki.ca), "--tls-cert", str(swarm.client_cert), "--tls-key",
                              str(swarm.client_key), "--peer", seed.addr, "--origin", nginx.url(), "--out",
                              str(tmp_path / "out"), *fetch_extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(1.2)
        seed.kill()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert same_tree(swarm.model, tmp_path / "out")
        # Some pieces came from the seed before it died, the rest from the origin.
        assert re.search(rf"{re.escape(nginx.url().rstrip('/'))}: [1-9]\d* pieces", out), out
        assert re.search(rf"peer {re.escape(seed.addr)}: [1-9]\d* pieces", out), out
        return err
    finally:
        nginx.stop()


def test_a_peer_killed_mid_transfer_is_replaced_by_the_origin(swarm, tmp_path):
    fetch_while_the_seed_is_killed(swarm, tmp_path)


def test_leechers_started_together_trade_pieces(swarm, drun, drun_bin, tmp_path):
    """One seed, three leechers each serving its own store while fetching: all complete, verify,
    and the seed does not serve every piece to everyone."""
    seed = swarm.serve(extra=["--limit-rate", "2M"])
    leech_servers = [swarm.serve(store=tmp_path / f"l{i}") for i in range(3)]
    procs = []
    for i in range(3):
        peers = [seed.addr] + [s.addr for j, s in enumerate(leech_servers) if j != i]
        argv = [drun_bin, "fetch", "--signature", swarm.sig, "--public-key", swarm.pub, "--store", tmp_path / f"l{i}",
                "--key-source", swarm.ks, "--ca-cert", swarm.pki.ca, "--tls-cert", swarm.client_cert, "--tls-key",
                swarm.client_key, "--out", tmp_path / f"out{i}"]
        for p in peers:
            argv += ["--peer", p]
        procs.append(subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for i in range(3):
        assert same_tree(swarm.model, tmp_path / f"out{i}")
    stats = seed.stop()
    served_by_leechers = sum(s.stop()["pieces"] for s in leech_servers)
    assert stats["pieces"] + served_by_leechers == 3 * N, (stats, served_by_leechers)
    assert served_by_leechers > 0, (stats, served_by_leechers)


def test_a_swarm_started_together_takes_each_piece_from_the_origin_once(swarm, drun_bin, tmp_path):
    """Three nodes, each serving its store and fetching from the origin and the others, started
    together with --swarm-self: the origin's pieces are shared out, so it sends the model once."""
    nginx = Nginx(tmp_path, swarm.model)
    servers = [swarm.serve(store=tmp_path / f"n{i}") for i in range(3)]
    members = [s.addr for s in servers]
    procs = []
    try:
        for i in range(3):
            argv = [drun_bin, "fetch", "--signature", swarm.sig, "--public-key", swarm.pub, "--store", tmp_path / f"n{i}",
                    "--key-source", swarm.ks, "--ca-cert", swarm.pki.ca, "--tls-cert", swarm.client_cert,
                    "--tls-key", swarm.client_key, "--origin", nginx.url(), "--swarm-self", members[i],
                    "--out", tmp_path / f"out{i}"]
            for m in members:
                argv += ["--peer", m]
            procs.append(subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
        for i in range(3):
            assert same_tree(swarm.model, tmp_path / f"out{i}")
        size = (swarm.model / "weights.bin").stat().st_size
        assert nginx.bytes_sent("weights.bin") == size, (nginx.bytes_sent("weights.bin"), size, outs)
        # Every node took a share from the origin (12 pieces of weights.bin over 3 nodes).
        for out, _ in outs:
            assert re.search(rf"{re.escape(nginx.url().rstrip('/'))}: [1-9]\d* pieces", out), out
    finally:
        nginx.stop()


def test_bad_tokens_are_refused_by_the_server(swarm, drun, tmp_path):
    """Tokens minted independently (PyJWT): expired, not yet valid, signed by another key, and
    alg none are each refused with exit 4; a good one from the same issuer works."""
    jwt = pytest.importorskip("jwt", reason="PyJWT (python3-jwt) is not installed")
    from cryptography.hazmat.primitives.asymmetric import ec
    import base64

    def b64(n, size):
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()

    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_numbers()
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [
        {"kty": "EC", "crv": "P-256", "x": b64(pub.x, 32), "y": b64(pub.y, 32), "kid": "k1", "use": "sig"}]}))
    now = int(time.time())
    claims = {"sub": "system:serviceaccount:ml:loader", "aud": "drun", "exp": now + 600,
              "drun_artifacts": [swarm.artifact]}

    def write(name, text):
        p = tmp_path / name
        p.write_text(text + "\n")
        os.chmod(p, 0o600)
        return p

    good = write("good.jwt", jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"}))
    bad = {
        "expired": jwt.encode({**claims, "exp": now - 3600}, key, algorithm="ES256", headers={"kid": "k1"}),
        "not-yet-valid": jwt.encode({**claims, "nbf": now + 3600}, key, algorithm="ES256", headers={"kid": "k1"}),
        "other-key": jwt.encode(claims, other, algorithm="ES256", headers={"kid": "k1"}),
        "alg-none": jwt.encode(claims, None, algorithm="none"),
    }
    seed = swarm.serve(extra=["--jwks", tmp_path / "jwks.json", "--allow-token-only"])
    swarm.fetch(seed.addr, cert=False, extra=["--token-file", good]).ok()
    for i, (name, text) in enumerate(bad.items()):
        r = swarm.fetch(seed.addr, cert=False, store=f"bad{i}", extra=["--token-file", write(f"{name}.jwt", text)])
        r.fails(4, "token refused")
        assert text not in r.err
    stats = seed.stop()
    assert stats["pieces"] == N and stats["handshakes_refused"] >= len(bad), stats
    assert "eyJ" not in seed.out + seed.err


def test_peer_certificates_for_the_swarm_name_instead_of_each_address(swarm, drun_bin, tmp_path):
    """--peer-server-name: members of a headless Service share a name, not their addresses."""
    cert, key = swarm.pki.issue("member", ip=None, dns="drun-peers.ml.svc.cluster.local")
    member = Serve(drun_bin, tmp_path / "seed", swarm.ks, cert, key, swarm.pki.ca)
    swarm.servers.append(member)
    # Its certificate names no address: by address, it is refused.
    swarm.fetch(member.addr).fails(3, "certificate")
    swarm.fetch(member.addr, extra=["--peer-server-name", "other.ml.svc.cluster.local"]).fails(3, "certificate")
    swarm.fetch(member.addr, extra=["--peer-server-name", "drun-peers.ml.svc.cluster.local",
                                    "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")


def test_peers_from_dns_every_address_of_a_name(swarm, tmp_path):
    seed = swarm.serve()
    # localhost may resolve to ::1 as well: the seed listens on 127.0.0.1 only, so that address
    # fails and is dropped while the other serves everything.
    r = swarm.fetch(extra=["--peers-dns", f"localhost:{seed.port}", "--out", tmp_path / "out"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert re.search(rf"peer 127\.0\.0\.1:{seed.port}: {N} pieces", r.out), r


def test_a_peer_that_announces_pieces_it_never_serves_does_not_stall_the_fetch(swarm, drun, tmp_path):
    """It lists every piece, then answers "not found" to each request: each piece is asked of it
    once, then taken from the origin."""
    liar = LyingPeer(swarm.pki, swarm.model, swarm.sig, manifest_json(drun, swarm.sig), refuse=True)
    nginx = Nginx(tmp_path, swarm.model)
    try:
        t0 = time.time()
        r = swarm.fetch(liar.addr, origin=nginx.url(), extra=["--out", tmp_path / "out"]).ok()
        assert time.time() - t0 < 20, "the fetch waited on the peer"
        assert same_tree(swarm.model, tmp_path / "out")
        assert re.search(rf"{re.escape(nginx.url().rstrip('/'))}: {N} pieces", r.out), r
        assert liar.served <= N  # never asked twice for the same piece
    finally:
        liar.stop()
        nginx.stop()


# --- unauthenticated sockets and busy peers (security review, finding 2) ---------------------------


def test_idle_unauthenticated_sockets_do_not_lock_callers_out(swarm, tmp_path):
    """An attacker without a certificate holds and renews a hundred idle TCP sockets (from
    127.0.0.2, another address of this host): it gets a few handshake slots, each closed after the
    first-byte deadline, and a `drun fetch --peer` from 127.0.0.1 completes from that server,
    which it does not drop."""
    seed = swarm.serve()
    port = seed.port
    stop = threading.Event()
    held = []
    opened = [0]

    def attack():
        while not stop.is_set():
            # Renew what the server closed: a closed socket reads as EOF (or a reset).
            for s in list(held):
                try:
                    s.setblocking(False)
                    if s.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                held.remove(s)
                s.close()
            while len(held) < 100 and not stop.is_set():
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    s.close()
                    break
                held.append(s)
                opened[0] += 1
            stop.wait(0.2)

    t = threading.Thread(target=attack, daemon=True)
    t.start()
    try:
        time.sleep(1.0)  # the attack is in place before the fetch starts
        start = time.monotonic()
        r = swarm.fetch(seed.addr, extra=["--out", tmp_path / "out"]).ok()
        took = time.monotonic() - start
        assert same_tree(swarm.model, tmp_path / "out")
        assert re.search(rf"peer {re.escape(seed.addr)}: {N} pieces", r.out), r
        assert "dropped" not in r.out and "dropped" not in r.err, r
        assert took < 30, f"the fetch took {took:.1f} s under the attack"
    finally:
        stop.set()
        t.join(10)
        for s in held:
            s.close()
    stats = seed.stop()
    # The attacker was turned away: most of its sockets closed on accept, the rest after 2 s.
    assert opened[0] > 100 and stats["busy"] > 0, (opened[0], stats)


def test_a_peer_at_its_connection_limit_is_waited_for_not_dropped(swarm, tmp_path):
    """A seed that takes one connection at a time closes the fetch's others on accept. That is the
    peer being busy, not failing: the fetch (no origin to fall back on) completes from it."""
    seed = swarm.serve(extra=["--max-connections", "1"])
    r = swarm.fetch(seed.addr, extra=["--out", tmp_path / "out", "--connections", "4"]).ok()
    assert same_tree(swarm.model, tmp_path / "out")
    assert re.search(rf"peer {re.escape(seed.addr)}: {N} pieces", r.out), r
    assert "dropped" not in r.out, r
    stats = seed.stop()
    assert stats["pieces"] == N, stats
