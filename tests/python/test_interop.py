"""Interoperability: drun against an independent OMS implementation (oms_ref.py) and the openssl CLI.

Tests named test_oms_ref_* check oms_ref itself and need no drun:
    /usr/bin/python3 -m pytest -q test_interop.py -k oms_ref
The rest run the drun binary from DRUN_BIN (skipped when unset).
"""

import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

import oms_ref
from conftest import (EMPTY_FILE, MODEL_FILES, PIECE, bundle_statement, det_bytes, flip_byte, load_bundle,
                      make_model, model_file_names, save_bundle)

HERE = Path(__file__).resolve().parent
OMS_REF = HERE / "oms_ref.py"
PY = "/usr/bin/python3"
DAY = datetime.timedelta(days=1)


def run_ref(*args):
    return subprocess.run([PY, str(OMS_REF), *map(str, args)], capture_output=True, text=True, timeout=60)


def openssl(*args, input=None):
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, input=input, timeout=60)


def ref_verify_ok(model, sig, pub=None, ca=None, **kw):
    return oms_ref.verify_model(model, sig, Path(pub).read_bytes() if pub else None,
                                Path(ca).read_bytes() if ca else None, **kw)


def ref_verify_fails(model, sig, pub=None, ca=None, match="", **kw):
    with pytest.raises(oms_ref.OmsError) as ei:
        ref_verify_ok(model, sig, pub, ca, **kw)
    assert match.lower() in str(ei.value).lower(), str(ei.value)
    return str(ei.value)


# ------------------------------------------------------------------------------------------------
# bundle variants produced by oms_ref (like model_signing, or like the spec)

# id, kind (dir|file), method, hash_type, shard_size, curve, variant, sig outside model
REF_CASES = [
    ("files-sha256", "dir", "files", "sha256", None, "p256", {}, False),
    ("shards-reference-alg", "dir", "shards", "sha256", PIECE, "p256", {}, False),
    ("shards-spec-alg", "dir", "shards", "sha256", PIECE, "p256", {"shardalg": "spec"}, False),
    ("shards-float-size", "dir", "shards", "sha256", PIECE, "p256", {"shardsize": "float"}, False),
    ("shards-1e9-float", "dir", "shards", "sha256", 1_000_000_000, "p256", {"shardsize": "float"}, False),
    ("files-blake2b", "dir", "files", "blake2b", None, "p256", {}, False),
    ("shards-blake2b", "dir", "shards", "blake2b", PIECE, "p384", {}, False),
    ("files-blake3", "dir", "files", "blake3", None, "p256", {}, False),
    ("shards-blake3", "dir", "shards", "blake3", PIECE, "p256", {}, False),
    ("single-dot-files", "file", "files", "sha256", None, "p256", {"single": "dot"}, False),
    ("single-basename-files", "file", "files", "sha256", None, "p256", {"single": "basename"}, False),
    ("single-dot-shards", "file", "shards", "sha256", PIECE, "p256", {"single": "dot"}, False),
    ("single-basename-shards-spec", "file", "shards", "sha256", PIECE, "p384",
     {"single": "basename", "shardalg": "spec"}, False),
    ("rawbytes-p384-files", "dir", "files", "sha256", None, "p384", {"key": "rawbytes"}, False),
    ("rawbytes-p521-shards", "dir", "shards", "sha256", PIECE, "p521",
     {"key": "rawbytes", "shardsize": "float"}, False),
    ("hint-p521", "dir", "files", "sha256", None, "p521", {}, False),
    ("compact-payload", "dir", "shards", "sha256", PIECE, "p256", {"payload": "compact"}, False),
    ("keyid-empty", "dir", "files", "sha256", None, "p256", {"keyid": "empty"}, False),
    ("keyid-null", "dir", "files", "sha256", None, "p256", {"keyid": "null"}, False),
    ("codepoint-order-files", "dir", "files", "sha256", None, "p256", {"order": "codepoint"}, False),
    ("codepoint-order-shards", "dir", "shards", "sha256", PIECE, "p256", {"order": "codepoint"}, False),
    ("sig-outside-model", "dir", "shards", "sha256", PIECE, "p256", {}, True),
]


def make_ref_bundle(tmp_path, ref_keys, case):
    """-> (target, sig, pub, file to tamper with)."""
    _, kind, method, hash_type, shard_size, curve, variant, outside = case
    key, _, pub = ref_keys[curve]
    if kind == "dir":
        target = make_model(tmp_path / "refmodel")
        sig = tmp_path / "outside.sig" if outside else target / "model.sig"
        victim = target / "weights.bin"
    else:
        target = tmp_path / "single.bin"
        target.write_bytes(det_bytes(150 * 1024, 3))
        sig = tmp_path / "single.bin.sig"
        victim = target
    oms_ref.sign_model(target, key, sig, method, hash_type, shard_size or oms_ref.DEFAULT_SHARD_SIZE,
                       variant=variant)
    return target, sig, pub, victim


# ------------------------------------------------------------------------------------------------
# oms_ref self-tests (no drun needed)


def test_oms_ref_pae_known_answer():
    # the DSSE protocol's worked example
    assert oms_ref.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert oms_ref.pae("application/vnd.in-toto+json", b"") == b"DSSEv1 28 application/vnd.in-toto+json 0 "


def test_oms_ref_root_digest_known_answer():
    res = [{"digest": "00" * 32}, {"digest": "ff" * 64}]  # raw bytes, whatever their length
    assert oms_ref.root_digest(res) == hashlib.sha256(b"\x00" * 32 + b"\xff" * 64).hexdigest()
    assert oms_ref.root_digest(list(reversed(res))) != oms_ref.root_digest(res)


def test_oms_ref_hashes():
    assert oms_ref.new_hasher("blake2b").digest_size == 64
    b3 = oms_ref.new_hasher("blake3")
    b3.update(b"abc")
    assert b3.hexdigest() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert oms_ref.new_hasher("sha256").name == "sha256"
    with pytest.raises(oms_ref.OmsError):
        oms_ref.new_hasher("md5")


@pytest.mark.parametrize("curve", ["p256", "p384", "p521", "ed25519"])
def test_oms_ref_canonical_pem_matches_openssl(tmp_path, ref_keys, curve):
    key, kp, _ = ref_keys[curve]
    p = openssl("pkey", "-in", kp, "-pubout", "-outform", "PEM")
    assert p.returncode == 0, p.stderr
    assert oms_ref.canonical_public_pem(key.public_key()) == p.stdout
    assert oms_ref.key_hint(key.public_key()) == hashlib.sha256(p.stdout).hexdigest()
    # text before BEGIN is skipped
    assert oms_ref.key_hint(oms_ref.load_public_key_pem(b"subject=whoever\n" + p.stdout)) == \
        oms_ref.key_hint(key.public_key())


def test_oms_ref_shard_name_parsing():
    assert oms_ref.parse_shard_name("a:b.bin:0:10") == ("a:b.bin", 0, 10)
    assert oms_ref.parse_shard_name("d/f:65536:131072") == ("d/f", 65536, 131072)
    for bad in ("nocolon", "f:1", "f:x:2"):
        with pytest.raises(oms_ref.OmsError):
            oms_ref.parse_shard_name(bad)
    assert oms_ref.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert oms_ref.shard_ranges(0, 4) == []


def test_oms_ref_safe_names():
    for good in ("a", "a/b.bin", "a:b", "x..y", ".hidden/f"):
        assert oms_ref.is_safe_name(good), good
    for bad in ("", "/etc/passwd", "../x", "a/../b", "a/./b", "./a", "a//b", "a/", "."):
        assert not oms_ref.is_safe_name(bad), bad


def test_oms_ref_resource_order(tmp_path):
    m = make_model(tmp_path / "m")
    comp = [r["name"] for r in oms_ref.compute_resources(m, "files")]
    code = [r["name"] for r in oms_ref.compute_resources(m, "files", order="codepoint")]
    assert comp.index("tokenizer/vocab.txt") < comp.index("tokenizer.json")  # component-wise
    assert code.index("tokenizer.json") < code.index("tokenizer/vocab.txt")  # '.' < '/'
    assert sorted(comp) == code
    big = make_model(tmp_path / "n", {"f.bin": 11_000})
    names = [r["name"] for r in oms_ref.compute_resources(big, "shards", shard_size=1000)]
    assert [oms_ref.parse_shard_name(n)[1] for n in names] == list(range(0, 11_000, 1000))  # numeric
    code = [r["name"] for r in oms_ref.compute_resources(big, "shards", shard_size=1000, order="codepoint")]
    assert code == sorted(names) and code != names


def test_oms_ref_resources_match_hashlib(tmp_path):
    m = make_model(tmp_path / "m")
    (m / EMPTY_FILE).write_bytes(b"")
    files = {r["name"]: r for r in oms_ref.compute_resources(m, "files", "blake2b")}
    assert set(files) == model_file_names(m)
    data = (m / "weights.bin").read_bytes()
    assert files["weights.bin"]["digest"] == hashlib.blake2b(data, digest_size=64).hexdigest()
    assert files["weights.bin"]["algorithm"] == "blake2b"
    assert files["tokenizer/empty.txt"]["digest"] == hashlib.blake2b(b"", digest_size=64).hexdigest()
    shards = {r["name"]: r for r in oms_ref.compute_resources(m, "shards", "sha256", PIECE)}
    assert shards["weights.bin:65536:131072"]["digest"] == hashlib.sha256(data[65536:131072]).hexdigest()
    assert shards["weights.bin:65536:131072"]["algorithm"] == f"sha256-sharded-{PIECE}"
    assert not any(n.startswith("tokenizer/empty.txt") for n in shards)
    spec = oms_ref.compute_resources(m, "shards", "sha256", PIECE, shardalg="spec")
    assert {r["algorithm"] for r in spec} == {"sha256"}
    single = tmp_path / "one.bin"
    single.write_bytes(b"abc")
    assert [r["name"] for r in oms_ref.compute_resources(single, "files")] == ["."]
    assert [r["name"] for r in oms_ref.compute_resources(single, "shards", single="basename")] == ["one.bin:0:3"]


@pytest.mark.parametrize("case", REF_CASES, ids=[c[0] for c in REF_CASES])
def test_oms_ref_roundtrip_and_tamper(tmp_path, ref_keys, case):
    target, sig, pub, victim = make_ref_bundle(tmp_path, ref_keys, case)
    b = load_bundle(sig)
    st = bundle_statement(b)
    _, kind, method, hash_type, shard_size, curve, variant, outside = case
    ser = st["predicate"]["serialization"]
    assert b["mediaType"] == oms_ref.BUNDLE_MEDIA_TYPE
    assert st["predicateType"] == oms_ref.PREDICATE_TYPE
    assert (ser["method"], ser["hash_type"]) == (method, hash_type)
    if method == "shards":
        assert ser["shard_size"] == shard_size
        assert isinstance(ser["shard_size"], float) == (variant.get("shardsize") == "float")
    if variant.get("key") == "rawbytes":
        assert "rawBytes" in b["verificationMaterial"]["publicKey"]
        assert b["verificationMaterial"]["publicKey"]["keyDetails"].startswith("PKIX_ECDSA_P")
    else:
        assert "hint" in b["verificationMaterial"]["publicKey"]
    raw_payload = base64.b64decode(b["dsseEnvelope"]["payload"])
    assert (b"\n" in raw_payload) == (variant.get("payload", "indent") == "indent")
    ref_verify_ok(target, sig, pub)
    flip_byte(victim, 70000)
    ref_verify_fails(target, sig, pub, match="mismatch")


def test_oms_ref_detects_flipped_byte_via_cli(tmp_path):
    m = make_model(tmp_path / "m")
    key = tmp_path / "k.pem"
    assert run_ref("keygen", "--curve", "p256", "--out", key).returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    r = run_ref("sign", m, "--key", key, "--method", "shards", "--shard-size", PIECE)
    assert r.returncode == 0, r.stderr
    r = run_ref("verify", m, "--sig", m / "model.sig", "--public-key", f"{key}.pub")
    assert r.returncode == 0, r.stderr
    flip_byte(m / "weights.bin", 131072)
    r = run_ref("verify", m, "--sig", m / "model.sig", "--public-key", f"{key}.pub")
    assert r.returncode == 1
    assert "weights.bin:131072:196608: digest mismatch" in r.stderr


def test_oms_ref_detects_tampering(tmp_path, ref_keys):
    key, _, pub = ref_keys["p256"]
    _, _, pub384 = ref_keys["p384"]
    m = make_model(tmp_path / "m")
    sig = m / "model.sig"
    oms_ref.sign_model(m, key, sig, "shards", shard_size=PIECE)
    ref_verify_ok(m, sig, pub)
    ref_verify_fails(m, sig, pub384, match="hint")
    good = load_bundle(sig)

    b = json.loads(json.dumps(good))
    del b["verificationMaterial"]["publicKey"]["hint"]
    save_bundle(b, sig)
    ref_verify_ok(m, sig, pub)
    ref_verify_fails(m, sig, pub384, match="signature")

    b = json.loads(json.dumps(good))
    st = bundle_statement(b)
    st["predicate"]["resources"][0]["digest"] = "00" * 32
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    save_bundle(b, sig)
    ref_verify_fails(m, sig, pub, match="signature")

    b = json.loads(json.dumps(good))
    b["dsseEnvelope"]["payload"] = "!!!" + b["dsseEnvelope"]["payload"][3:]
    save_bundle(b, sig)
    ref_verify_fails(m, sig, pub, match="base64")

    sig.write_text(json.dumps(good)[:100])
    ref_verify_fails(m, sig, pub, match="JSON")

    save_bundle(good, sig)
    (m / "extra.txt").write_text("x")
    ref_verify_fails(m, sig, pub, match="extra.txt:0:1: not in the manifest")
    ref_verify_ok(m, sig, pub, ignore_unsigned=True)
    (m / "config.json").unlink()
    ref_verify_fails(m, sig, pub, match="config.json:0:", ignore_unsigned=True)
    os.symlink("weights.bin", m / "config.json")
    ref_verify_fails(m, sig, pub, match="symlink", ignore_unsigned=True)


def test_oms_ref_rejects_unsafe_and_empty(tmp_path, ref_keys):
    key, _, pub = ref_keys["p256"]
    m = make_model(tmp_path / "m", {"ok.bin": 10})
    res = oms_ref.compute_resources(m, "files") + [{"algorithm": "sha256", "name": "../x", "digest": "00" * 32}]
    sig = tmp_path / "m.sig"
    oms_ref.write_bundle(oms_ref.sign_statement(oms_ref.statement_from_resources("m", res, "files", "sha256"),
                                                key), sig)
    ref_verify_fails(m, sig, pub, match="unsafe path")
    oms_ref.write_bundle(oms_ref.sign_statement(oms_ref.statement_from_resources("m", [], "files", "sha256"),
                                                key), sig)
    ref_verify_fails(m, sig, pub, match="empty")


@pytest.mark.parametrize("curve,digest", [("p256", "-sha256"), ("p384", "-sha384"), ("p521", "-sha512")])
def test_oms_ref_bundle_checks_with_openssl(tmp_path, ref_keys, curve, digest):
    key, _, pub = ref_keys[curve]
    m = make_model(tmp_path / "m", {"a.bin": 1000})
    oms_ref.sign_model(m, key, m / "model.sig")
    pae_bin, sig_der = tmp_path / "pae.bin", tmp_path / "sig.der"
    r = run_ref("extract", m / "model.sig", "--pae", pae_bin, "--sig-der", sig_der)
    assert r.returncode == 0, r.stderr
    p = openssl("dgst", digest, "-verify", pub, "-signature", sig_der, pae_bin)
    assert p.returncode == 0 and b"Verified OK" in p.stdout, p.stdout + p.stderr
    flip_byte(pae_bin, 40)
    assert openssl("dgst", digest, "-verify", pub, "-signature", sig_der, pae_bin).returncode != 0


# ---- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    root = oms_ref.make_root_ca()
    inter = oms_ref.make_intermediate_ca(root)
    evil_root = oms_ref.make_root_ca()  # same subject name as root, different key
    other_root = oms_ref.make_root_ca(cn="unrelated root", curve="p384")
    ns = SimpleNamespace(dir=d, root=root, inter=inter, evil_root=evil_root,
                         root_pem=d / "root.pem", multi_pem=d / "roots.pem", evil_pem=d / "evil.pem",
                         inter_pem=d / "inter.pem")
    oms_ref.write_certs(ns.root_pem, root[0])
    oms_ref.write_certs(ns.multi_pem, other_root[0], root[0])
    oms_ref.write_certs(ns.evil_pem, evil_root[0])
    oms_ref.write_certs(ns.inter_pem, inter[0])
    return ns


# id, leaf options, CA bundle attribute, include intermediate, sign with the leaf's key
now = datetime.datetime.utcnow()
CERT_GOOD = [
    ("ds-and-codesigning", {}, "root_pem", True),
    ("ds-only", {"eku": None}, "root_pem", True),
    ("codesigning-only", {"key_usage": None}, "root_pem", True),
    ("p384-leaf", {"curve": "p384"}, "root_pem", True),
    ("multi-root-bundle", {}, "multi_pem", True),
]
CERT_BAD = [
    ("expired-leaf", {"not_before": now - 30 * DAY, "not_after": now - DAY}, "root_pem", True),
    ("no-ds-no-codesigning", {"key_usage": ("key_agreement",), "eku": ("server_auth",)}, "root_pem", True),
    ("tls-server-cert", {"eku": ("server_auth",)}, "root_pem", True),  # digitalSignature, but not for code
    ("no-usage-extensions", {"key_usage": None, "eku": None}, "root_pem", True),
    ("untrusted-root-same-name", {}, "evil_pem", True),
    ("intermediate-missing", {}, "root_pem", False),
    ("signed-by-other-key", {"wrong_signer": True}, "root_pem", True),
]


def make_cert_bundle(tmp_path, pki, opts, with_inter):
    opts = dict(opts)
    wrong = opts.pop("wrong_signer", False)
    leaf_cert, leaf_key = oms_ref.make_leaf(pki.inter, **opts)
    m = make_model(tmp_path / "certmodel")
    chain = [leaf_cert, pki.inter[0]] if with_inter else [leaf_cert]
    signer = oms_ref.generate_key("p256") if wrong else leaf_key
    oms_ref.sign_model(m, signer, m / "model.sig", "shards", shard_size=PIECE, cert_chain=chain)
    return m, m / "model.sig"


def test_oms_ref_pki_is_valid_for_openssl(tmp_path, pki):
    leaf_cert, _ = oms_ref.make_leaf(pki.inter)
    oms_ref.write_certs(tmp_path / "leaf.pem", leaf_cert)
    p = openssl("verify", "-CAfile", pki.root_pem, "-untrusted", pki.inter_pem, tmp_path / "leaf.pem")
    assert p.returncode == 0, p.stdout + p.stderr
    p = openssl("verify", "-CAfile", pki.evil_pem, "-untrusted", pki.inter_pem, tmp_path / "leaf.pem")
    assert p.returncode != 0


@pytest.mark.parametrize("case", CERT_GOOD, ids=[c[0] for c in CERT_GOOD])
def test_oms_ref_cert_chain_accepted(tmp_path, pki, case):
    _, opts, ca, with_inter = case
    m, sig = make_cert_bundle(tmp_path, pki, opts, with_inter)
    certs = load_bundle(sig)["verificationMaterial"]["x509CertificateChain"]["certificates"]
    assert len(certs) == 2
    ref_verify_ok(m, sig, ca=getattr(pki, ca))
    flip_byte(m / "weights.bin", 0)
    ref_verify_fails(m, sig, ca=getattr(pki, ca), match="mismatch")


@pytest.mark.parametrize("case", CERT_BAD, ids=[c[0] for c in CERT_BAD])
def test_oms_ref_cert_chain_rejected(tmp_path, pki, case):
    _, opts, ca, with_inter = case
    m, sig = make_cert_bundle(tmp_path, pki, opts, with_inter)
    ref_verify_fails(m, sig, ca=getattr(pki, ca))


# ------------------------------------------------------------------------------------------------
# drun verifies what oms_ref produces


@pytest.mark.parametrize("case", REF_CASES, ids=[c[0] for c in REF_CASES])
def test_drun_verifies_reference_variant(drun, tmp_path, ref_keys, case):
    target, sig, pub, victim = make_ref_bundle(tmp_path, ref_keys, case)
    drun("verify", target, "--signature", sig, "--public-key", pub).ok()
    flip_byte(victim, 70000)
    drun("verify", target, "--signature", sig, "--public-key", pub).fails(1, "mismatch")


def test_drun_applies_recorded_ignore_paths(drun, tmp_path, ref_keys):
    key, _, pub = ref_keys["p256"]
    m = make_model(tmp_path / "m")
    (m / "notes.txt").write_text("scratch")
    oms_ref.sign_model(m, key, m / "model.sig", "files", ignore_paths=["notes.txt"])
    (m / "notes.txt").write_text("edited")
    drun("verify", m, "--signature", m / "model.sig", "--public-key", pub).ok()
    (m / "config.json").write_text("{}")
    drun("verify", m, "--signature", m / "model.sig", "--public-key", pub).fails(1, "config.json")


@pytest.mark.parametrize("method", ["shards", "files"])
def test_reference_bundles_of_models_with_an_empty_file(drun, tmp_path, ref_keys, method):
    """The reference implementation, like drun, gives an empty file no shard, and its verifier, which
    compares re-serialized manifests, lets any empty file through in shards mode. drun does not
    (security review, finding 6): a reference shards bundle of a model with an empty file verifies
    with --allow-unsigned-empty-files only, which is the price of refusing planted empty files. A
    files bundle lists empty files, so it verifies as it is, and a planted one is refused."""
    key, _, pub = ref_keys["p256"]
    m = make_model(tmp_path / "m")
    (m / EMPTY_FILE).write_bytes(b"")
    oms_ref.sign_model(m, key, m / "model.sig", method, "sha256", PIECE)
    ref_verify_ok(m, m / "model.sig", pub)
    names = {r["name"] for r in bundle_statement(m / "model.sig")["predicate"]["resources"]}
    assert (EMPTY_FILE in names) == (method == "files"), names
    args = ("verify", m, "--signature", m / "model.sig", "--public-key", pub)
    if method == "shards":
        drun(*args).fails(1, EMPTY_FILE, "empty file not in the manifest", "--allow-unsigned-empty-files")
        r = drun(*args, "--allow-unsigned-empty-files").ok()
        assert "WARNING" in r.err and EMPTY_FILE in r.err, r.err
    else:
        drun(*args).ok()
        (m / "adapter_config.json").write_bytes(b"")
        drun(*args, "--allow-unsigned-empty-files").fails(1, "adapter_config.json", "not in the manifest")


def test_drun_manifest_reads_reference_bundle(drun, tmp_path, ref_keys):
    key, _, _ = ref_keys["p256"]
    m = make_model(tmp_path / "m")
    oms_ref.sign_model(m, key, m / "model.sig", "shards", "blake2b", PIECE, variant={"shardalg": "spec"})
    j = json.loads(drun("manifest", m / "model.sig", "--json").ok().out)
    assert j["method"] == "shards" and j["hash_type"] == "blake2b"
    assert {f["name"] for f in j["files"]} >= model_file_names(m, include_empty=False)


@pytest.mark.parametrize("case", CERT_GOOD, ids=[c[0] for c in CERT_GOOD])
def test_drun_accepts_certificate_chain(drun, tmp_path, pki, case):
    _, opts, ca, with_inter = case
    m, sig = make_cert_bundle(tmp_path, pki, opts, with_inter)
    drun("verify", m, "--signature", sig, "--ca-bundle", getattr(pki, ca)).ok()
    flip_byte(m / "weights.bin", 0)
    drun("verify", m, "--signature", sig, "--ca-bundle", getattr(pki, ca)).fails(1, "mismatch")


@pytest.mark.parametrize("case", CERT_BAD, ids=[c[0] for c in CERT_BAD])
def test_drun_rejects_bad_certificate(drun, tmp_path, pki, case):
    _, opts, ca, with_inter = case
    m, sig = make_cert_bundle(tmp_path, pki, opts, with_inter)
    drun("verify", m, "--signature", sig, "--ca-bundle", getattr(pki, ca)).fails(1)


def test_drun_ca_bundle_needs_certificate_chain(drun, tmp_path, pki, ref_keys):
    # a key-method bundle verified against a CA bundle has no chain to check
    key, _, _ = ref_keys["p256"]
    m = make_model(tmp_path / "m")
    oms_ref.sign_model(m, key, m / "model.sig", "files")
    drun("verify", m, "--signature", m / "model.sig", "--ca-bundle", pki.root_pem).fails(1)


# ------------------------------------------------------------------------------------------------
# oms_ref (and openssl) verify what drun produces


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("method", ["shards", "files"])
@pytest.mark.parametrize("ktype", ["ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "ed25519"])
def test_reference_verifies_drun_bundle(drun, drun_keys, tmp_path, ktype, method, kind):
    key, pub = drun_keys[ktype]
    if kind == "dir":
        target = make_model(tmp_path / "m")
        sig, victim = target / "model.sig", target / "weights.bin"
    else:
        target = victim = tmp_path / "one.bin"
        target.write_bytes(det_bytes(150 * 1024, 5))
        sig = tmp_path / "one.bin.sig"
    args = ["sign", target, "--key", key, "--method", method]
    if method == "shards":
        args += ["--piece-size", PIECE]
    drun(*args).ok()
    st = ref_verify_ok(target, sig, pub)
    assert st["predicate"]["serialization"]["method"] == method
    flip_byte(victim, 70000)
    ref_verify_fails(target, sig, pub, match="mismatch")


def test_reference_cli_verifies_drun_bundle(drun, drun_keys, tmp_path):
    key, pub = drun_keys["ecdsa-p384"]
    m = make_model(tmp_path / "m")
    drun("sign", m, "--key", key, "--piece-size", PIECE).ok()
    r = run_ref("verify", m, "--sig", m / "model.sig", "--public-key", pub)
    assert r.returncode == 0, r.stderr
    (m / "tokenizer" / "vocab.txt").write_text("changed")
    r = run_ref("verify", m, "--sig", m / "model.sig", "--public-key", pub)
    assert r.returncode == 1 and "tokenizer/vocab.txt" in r.stderr, r.stderr


def test_drun_certificate_signing_verified_by_both(drun, tmp_path, pki):
    leaf_cert, leaf_key = oms_ref.make_leaf(pki.inter)
    d = tmp_path / "signer"
    d.mkdir()
    oms_ref.write_private_key(d / "leaf.key", leaf_key)
    oms_ref.write_certs(d / "leaf.pem", leaf_cert)
    m = make_model(tmp_path / "m")
    drun("sign", m, "--key", d / "leaf.key", "--cert", d / "leaf.pem", "--chain", pki.inter_pem,
         "--piece-size", PIECE).ok()
    sig = m / "model.sig"
    certs = load_bundle(sig)["verificationMaterial"]["x509CertificateChain"]["certificates"]
    ders = [base64.b64decode(c["rawBytes"]) for c in certs]
    assert ders[0] == leaf_cert.public_bytes(serialization.Encoding.DER)
    assert pki.inter[0].public_bytes(serialization.Encoding.DER) in ders[1:]
    ref_verify_ok(m, sig, ca=pki.root_pem)
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem).ok()
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.evil_pem).fails(1)
    flip_byte(m / "config.json", 2)
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem).fails(1, "config.json")


@pytest.mark.parametrize("ktype,digest", [("ecdsa-p256", "-sha256"), ("ecdsa-p384", "-sha384"),
                                          ("ecdsa-p521", "-sha512")])
def test_openssl_verifies_drun_bundle(drun, drun_keys, tmp_path, ktype, digest):
    key, pub = drun_keys[ktype]
    m = make_model(tmp_path / "m", {"a.bin": 5000, "b/c.txt": b"hello"})
    drun("sign", m, "--key", key, "--piece-size", PIECE).ok()
    pae, sig = oms_ref.extract_pae_and_sig(m / "model.sig")
    assert pae.startswith(b"DSSEv1 28 application/vnd.in-toto+json ")
    (tmp_path / "pae.bin").write_bytes(pae)
    (tmp_path / "sig.der").write_bytes(sig)
    p = openssl("dgst", digest, "-verify", pub, "-signature", tmp_path / "sig.der", tmp_path / "pae.bin")
    assert p.returncode == 0 and b"Verified OK" in p.stdout, p.stdout + p.stderr
    flip_byte(tmp_path / "pae.bin", len(pae) - 5)
    p = openssl("dgst", digest, "-verify", pub, "-signature", tmp_path / "sig.der", tmp_path / "pae.bin")
    assert p.returncode != 0


def test_drun_uses_openssl_generated_key_and_pem_with_preamble(drun, tmp_path):
    k, pub = tmp_path / "k.pem", tmp_path / "pub.pem"
    assert openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", k).returncode == 0
    os.chmod(k, 0o600)
    p = openssl("pkey", "-in", k, "-pubout")
    assert p.returncode == 0
    pub.write_bytes(b"Publisher: drun tests\nsubject=CN=whoever\n" + p.stdout)
    m = make_model(tmp_path / "m")
    drun("sign", m, "--key", k, "--piece-size", PIECE).ok()
    b = load_bundle(m / "model.sig")
    assert b["verificationMaterial"]["publicKey"]["hint"] == hashlib.sha256(p.stdout).hexdigest()
    drun("verify", m, "--signature", m / "model.sig", "--public-key", pub).ok()
    ref_verify_ok(m, m / "model.sig", pub)


# ------------------------------------------------------------------------------------------------
# certificate time policy, and drun's blake2b bundles checked by the independent implementation


def test_expired_leaf_is_accepted_only_under_the_not_before_policy(drun, tmp_path, pki):
    # Expired an hour ago, issued while the CAs were already valid.
    hour = datetime.timedelta(hours=1)
    m, sig = make_cert_bundle(tmp_path, pki, {"not_before": now - 12 * hour, "not_after": now - hour}, True)
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem).fails(1, "expired")
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem, "--certificate-time", "not-before").ok()
    flip_byte(m / "weights.bin", 0)
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem,
         "--certificate-time", "not-before").fails(1, "mismatch")
    drun("verify", m, "--signature", sig, "--ca-bundle", pki.root_pem, "--certificate-time", "later").fails(2)


@pytest.mark.parametrize("hash_type,hex_len", [("blake2b", 128), ("blake3", 64)])
@pytest.mark.parametrize("method", ["files", "shards"])
def test_drun_blake_bundles_verified_by_oms_ref(drun, drun_keys, tmp_path, method, hash_type, hex_len):
    m = make_model(tmp_path / "m")
    args = ["sign", m, "--key", drun_keys["ecdsa-p384"][0], "--hash", hash_type, "--method", method]
    if method == "shards":
        args += ["--piece-size", PIECE]
    drun(*args).ok()
    st = bundle_statement(load_bundle(m / "model.sig"))
    assert st["predicate"]["serialization"]["hash_type"] == hash_type
    assert all(len(r["digest"]) == hex_len for r in st["predicate"]["resources"])
    ref_verify_ok(m, m / "model.sig", pub=drun_keys["ecdsa-p384"][1])
    drun("verify", m, "--public-key", drun_keys["ecdsa-p384"][1]).ok()
    flip_byte(m / "weights.bin", 3)
    ref_verify_fails(m, m / "model.sig", pub=drun_keys["ecdsa-p384"][1], match="mismatch")
    drun("verify", m, "--public-key", drun_keys["ecdsa-p384"][1]).fails(1, f"{hash_type} digest mismatch")


def test_blake3_digests_match_b3sum_over_whole_files_and_byte_ranges(drun, drun_keys, tmp_path):
    """The independent check: Debian's b3sum (the BLAKE3 team's Rust code) over each whole file
    (files) and over each shard's byte range (shards), against what drun signed."""
    b3sum = shutil.which("b3sum")
    if not b3sum:
        assert not os.environ.get("CI"), "b3sum is missing (scripts/bootstrap.sh installs it)"
        pytest.skip("b3sum is not installed")
    m = make_model(tmp_path / "m")
    key = drun_keys["ed25519"][0]
    for method in ("files", "shards"):
        sig = tmp_path / f"{method}.sig"
        args = ["sign", m, "--key", key, "--hash", "blake3", "--method", method, "--signature", sig]
        drun(*(args + (["--piece-size", 4096] if method == "shards" else []))).ok()
        resources = bundle_statement(load_bundle(sig))["predicate"]["resources"]
        assert resources
        for r in resources:
            if method == "files":
                path, start, end = r["name"], 0, None
            else:
                path, start, end = oms_ref.parse_shard_name(r["name"])
            data = (m / path).read_bytes()[start:end]
            want = subprocess.run([b3sum, "--no-names"], input=data, capture_output=True, check=True).stdout
            assert r["digest"] == want.decode().strip(), r["name"]


def test_a_ca_certificate_cannot_sign_models(drun, tmp_path, pki):
    # The intermediate has digitalSignature, but it is a CA: it certifies signers, it is not one.
    m = make_model(tmp_path / "m")
    inter_cert, inter_key = pki.inter
    oms_ref.sign_model(m, inter_key, m / "model.sig", "shards", shard_size=PIECE, cert_chain=[inter_cert])
    drun("verify", m, "--signature", m / "model.sig", "--ca-bundle", pki.root_pem).fails(1, "CA certificate")
    ref_verify_fails(m, m / "model.sig", ca=pki.root_pem, match="CA certificate")
