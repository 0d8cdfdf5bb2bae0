"""BLAKE3 bundles end to end (include/drun/hash.hpp): signed by drun, imported into the encrypted
store, fetched from a real nginx origin and from a drun peer over mutual TLS, lied about by a
peer, and damaged at rest; every digest also checked against Debian's b3sum, an independent
implementation. (Interop with the independent OMS checker is in test_interop.py.)"""

import json
import re
import shutil
import subprocess

import pytest

from conftest import det_bytes, flip_byte
from peerkit import PKI, Serve
from test_fetch import Nginx
from test_peers import LyingPeer, manifest_json, same_tree

PIECE = 65536


@pytest.fixture
def b3model(drun, drun_keys, tmp_path):
    m = tmp_path / "model"
    (m / "tok").mkdir(parents=True)
    (m / "weights.bin").write_bytes(det_bytes(9 * PIECE + 777, 3))
    (m / "tok" / "vocab.json").write_bytes(b'{"a": 1}')
    key, pub = drun_keys["ecdsa-p256"]
    sig = tmp_path / "model.sig"
    drun("sign", m, "--key", key, "--hash", "blake3", "--piece-size", PIECE, "--signature", sig).ok()
    man = json.loads(drun("manifest", sig, "--json").ok().out)
    assert man["hash_type"] == "blake3"
    return m, sig, pub, man["artifact_id"]


def test_a_blake3_bundle_through_the_store_an_origin_and_a_peer(drun, drun_bin, b3model, tmp_path):
    m, sig, pub, art = b3model
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    ks = f"file:{tmp_path / 'node.key'}"
    # Origin -> store A (every piece checked with BLAKE3), exported bit-identical.
    nginx = Nginx(tmp_path, m)
    try:
        drun("fetch", "--signature", sig, "--public-key", pub, "--store", tmp_path / "a", "--key-source", ks,
             "--origin", nginx.url(), "--out", tmp_path / "out-a").ok()
    finally:
        nginx.stop()
    assert same_tree(m, tmp_path / "out-a")
    # Store A serves store B over mutual TLS; the bundle comes from the peer, checked against our key.
    pki = PKI(tmp_path / "pki")
    scert, skey = pki.issue("seed")
    ccert, ckey = pki.issue("leecher")
    seed = Serve(drun_bin, tmp_path / "a", ks, scert, skey, pki.ca)
    try:
        drun("fetch", "--artifact", art, "--public-key", pub, "--peer", seed.addr, "--store", tmp_path / "b",
             "--key-source", ks, "--ca-cert", pki.ca, "--tls-cert", ccert, "--tls-key", ckey,
             "--out", tmp_path / "out-b").ok()
    finally:
        stats = seed.stop()
    assert stats["pieces"] == 11 and same_tree(m, tmp_path / "out-b")
    drun("cache", "verify", "--store", tmp_path / "b", "--key-source", ks).ok()
    # Damage at rest is found by the scrub, which checks the tag and the BLAKE3 digest.
    data = max((tmp_path / "b" / "artifacts").glob("*/data/*"), key=lambda p: p.stat().st_size)
    flip_byte(data, 5000)
    drun("cache", "verify", "--store", tmp_path / "b", "--key-source", ks).fails(1)


def test_a_peer_lying_about_a_blake3_piece_is_banned(drun, drun_keys, b3model, tmp_path):
    m, sig, pub, art = b3model
    pki = PKI(tmp_path / "pki")
    liar = LyingPeer(pki, m, sig, manifest_json(drun, sig))
    ccert, ckey = pki.issue("leecher")
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    try:
        r = drun("fetch", "--signature", sig, "--public-key", pub, "--peer", liar.addr, "--store", tmp_path / "s",
                 "--key-source", f"file:{tmp_path / 'node.key'}", "--ca-cert", pki.ca, "--tls-cert", ccert,
                 "--tls-key", ckey, "--attempts", 2)
    finally:
        liar.stop()
    r.fails(1, "blake3 digest mismatch")
    assert "banned" in r.err


def test_sign_files_and_shards_agree_with_b3sum(drun, drun_keys, tmp_path):
    b3sum = shutil.which("b3sum")
    assert b3sum, "b3sum is missing (scripts/bootstrap.sh installs it)"
    big = tmp_path / "m" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(det_bytes((3 << 20) + 12345, 9))  # past BLAKE3's SIMD batch sizes, odd tail
    key = drun_keys["ed25519"][0]
    drun("sign", big.parent, "--key", key, "--hash", "blake3", "--method", "files",
         "--signature", tmp_path / "f.sig").ok()
    st = json.loads(drun("manifest", tmp_path / "f.sig", "--json").ok().out)
    want = subprocess.run([b3sum, "--no-names", str(big)], capture_output=True, check=True, text=True).stdout.strip()
    assert [f["name"] for f in st["files"]] == ["big.bin"]
    res = bundle_resources(tmp_path / "f.sig")
    assert res == {"big.bin": want}
    drun("sign", big.parent, "--key", key, "--hash", "blake3", "--piece-size", 1 << 20,
         "--signature", tmp_path / "s.sig").ok()
    data = big.read_bytes()
    for name, digest in bundle_resources(tmp_path / "s.sig").items():
        start, end = map(int, re.match(r".*:(\d+):(\d+)$", name).groups())
        got = subprocess.run([b3sum, "--no-names"], input=data[start:end], capture_output=True, check=True)
        assert digest == got.stdout.decode().strip(), name


def bundle_resources(sig):
    import base64
    bundle = json.loads(open(sig).read())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
