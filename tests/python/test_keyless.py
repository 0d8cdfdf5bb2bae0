"""Sigstore keyless bundles through the drun CLI, offline: bundles from the test Sigstore instance
(tests/python/sigstore_ref.py, itself cross-checked with sigstore-js in test_sigstore_ref.py), real
public-good bundles from the model_signing reference project, and every hostile case refused at
the step that fails (exit 1), with malformed trust material and missing policies at exit 2.
fetch, cache import and serve policies take the same trust."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import oms_ref
import sigstore_ref
from conftest import PIECE, flip_byte, make_model
from peerkit import PKI, Serve

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "data" / "model-transparency"
SEEDS = HERE.parent / "sigstore-js" / "node_modules" / "@sigstore" / "tuf" / "seeds.json"

ID, ISS = sigstore_ref.DEFAULT_IDENTITY, sigstore_ref.DEFAULT_ISSUER

# The step each hostile case must fail at: the words drun's message uses.
HOSTILE_STEP = {
    "wrong_ca": "at certificate chain",
    "ca_outside_validfor": "validFor window",
    "expired_at_integrated_time": "at signing time",
    "missing_sct": "at SCT",
    "forged_sct": "at SCT",
    "sct_unknown_log": "at SCT",
    "forged_set": "signed entry timestamp does not verify",
    "altered_integrated_time": "signed entry timestamp does not verify",
    "proof_other_leaf": "inclusion proof does not lead from this entry",
    "checkpoint_other_key": "checkpoint is not signed by the log's key",
    "checkpoint_other_root": "checkpoint (tree size",
    "body_other_signature": "entry's signature does not match",
    "body_other_payload": "entry's payloadHash does not match",
    "body_other_verifier": "entry's verifier certificate does not match",
    "two_signatures": "2 signatures",
    "no_ca_in_root": "lists no certificate authority",
    "no_code_signing_eku": "no code-signing extended key usage",
    "tsa_untrusted": "at timestamp",
    "tsa_after_leaf_expiry": "outside the certificate's validity",
    "no_time_evidence": "no verified signing time",
    "no_tlog_entry": "no transparency log entry",
}


class Keyless:
    """One test Sigstore instance, a shards-signed model and a bundle per case, made once."""

    def __init__(self, d):
        self.dir = Path(d)
        self.inst = sigstore_ref.Instance(self.dir / "instance")
        self.root = self.dir / "trusted_root.json"
        self.inst.write_trusted_root(self.root)
        self.model = make_model(self.dir / "model", {"weights.bin": 5 * PIECE + 123, "config.json": b'{"a": 1}',
                                                      "sub/tokenizer.json": 3000})
        stmt = oms_ref.build_statement(self.model, method="shards", shard_size=PIECE)
        self.payload = oms_ref.serialize_payload(stmt)

    def bundle(self, name, identity=ID, issuer=ISS, root_tweaks=None, **opts):
        """(signature path, trusted root path) of a bundle signed with these options."""
        sig = self.dir / f"{name}.sig"
        sigstore_ref.write_json(self.inst.sign(self.payload, identity=identity, issuer=issuer, **opts), sig)
        root = self.root
        if root_tweaks:
            root = self.dir / f"{name}.root.json"
            self.inst.write_trusted_root(root, **root_tweaks)
        return sig, root


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    return Keyless(tmp_path_factory.mktemp("keyless"))


def verify(drun, kl, sig, root=None, identity=ID, issuer=ISS, model=None, extra=()):
    return drun("verify", model or kl.model, "--signature", sig, "--trusted-root", root or kl.root,
                "--identity", identity, "--identity-provider", issuer, *extra)


@pytest.mark.parametrize("case", sorted(sigstore_ref.GOOD))
def test_good_bundles_verify(drun, kl, case):
    c = sigstore_ref.GOOD[case]
    sig, root = kl.bundle(case, identity=c["identity"], issuer=c["issuer"], root_tweaks=c["root"], **c["sign"])
    r = verify(drun, kl, sig, root, c["identity"], c["issuer"]).ok()
    assert f"signed by sigstore: {c['identity']} via {c['issuer']}" in r.out, r


@pytest.mark.parametrize("case", sorted(sigstore_ref.HOSTILE))
def test_hostile_bundles_fail_at_their_step(drun, kl, case):
    c = sigstore_ref.HOSTILE[case]
    sig, root = kl.bundle(case, root_tweaks=c["root"], **c["sign"])
    verify(drun, kl, sig, root).fails(1, HOSTILE_STEP[case])


def test_every_hostile_case_has_an_expected_step():
    assert set(HOSTILE_STEP) == set(sigstore_ref.HOSTILE)


def test_identity_policy(drun, kl):
    sig, _ = kl.bundle("policy")
    verify(drun, kl, sig, identity="mallory@example.com").fails(
        1, "at identity", "alice@example.com", "not the required mallory@example.com")
    verify(drun, kl, sig, issuer="https://accounts.evil.example").fails(
        1, "at identity", "OIDC issuer is https://issuer.example.com")
    # Equality, never a prefix or a pattern.
    verify(drun, kl, sig, identity="alice@example.co").fails(1, "at identity")
    verify(drun, kl, sig, issuer=ISS + "/").fails(1, "at identity")
    # A policy is required: "any identity" does not exist.
    drun("verify", kl.model, "--signature", sig, "--trusted-root", kl.root).fails(2, "--identity")
    drun("verify", kl.model, "--signature", sig, "--trusted-root", kl.root, "--identity", ID).fails(
        2, "--identity-provider")
    drun("verify", kl.model, "--signature", sig, "--trusted-root", kl.root, "--identity", "",
         "--identity-provider", ISS).fails(2, "identity")
    drun("verify", kl.model, "--signature", sig, "--public-key", kl.root, "--identity", ID).fails(2, "--trusted-root")


def test_tampered_model_and_payload(drun, kl, tmp_path):
    sig, _ = kl.bundle("tamper")
    model = make_model(tmp_path / "copy", {"weights.bin": 5 * PIECE + 123, "config.json": b'{"a": 1}',
                                           "sub/tokenizer.json": 3000})
    verify(drun, kl, sig, model=model).ok()
    flip_byte(model / "weights.bin", 3 * PIECE + 7)
    verify(drun, kl, sig, model=model).fails(1, "weights.bin", "digest mismatch")
    # A statement swapped in the envelope: the logged payload hash and the signature both catch it.
    b = json.loads(sig.read_text())
    stmt = json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))
    stmt["predicate"]["resources"][0]["digest"] = "0" * 64
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    forged = tmp_path / "forged.sig"
    forged.write_text(json.dumps(b))
    verify(drun, kl, forged).fails(1, "payloadHash does not match")


def test_dsse_signature_is_checked_with_the_leaf(drun, kl, monkeypatch):
    """A log that consistently records a signature the leaf made over other bytes: every piece of
    evidence checks out, and only the DSSE signature step refuses it."""
    real_pae = oms_ref.pae
    monkeypatch.setattr(oms_ref, "pae", lambda t, p: real_pae(t, p + b" "))
    sig, _ = kl.bundle("dsse-other-message")
    monkeypatch.undo()
    verify(drun, kl, sig).fails(1, "at DSSE signature", "does not verify with the signing certificate's key")


def test_trust_kinds_do_not_mix(drun, drun_keys, kl, tmp_path):
    sig, _ = kl.bundle("mix")
    key, pub = drun_keys["ecdsa-p256"]
    drun("verify", kl.model, "--signature", sig, "--public-key", pub).fails(1, "keyless", "--trusted-root")
    pem = tmp_path / "fulcio.pem"
    root = json.loads(kl.root.read_text())
    certs = root["certificateAuthorities"][0]["certChain"]["certificates"]
    pem.write_text("".join("-----BEGIN CERTIFICATE-----\n" + c["rawBytes"] + "\n-----END CERTIFICATE-----\n"
                           for c in certs))
    drun("verify", kl.model, "--signature", sig, "--ca-bundle", pem).fails(1, "keyless", "--trusted-root")
    # A key-signed bundle offered a Sigstore trust store.
    m = make_model(tmp_path / "keyed")
    drun("sign", m, "--key", key).ok()
    drun("verify", m, "--trusted-root", kl.root, "--identity", ID, "--identity-provider", ISS).fails(
        1, "not keyless", "public key")


def test_manifest_shows_the_unverified_identity(drun, kl):
    sig, _ = kl.bundle("show", identity=sigstore_ref.WORKLOAD_IDENTITY, issuer=sigstore_ref.WORKLOAD_ISSUER)
    r = drun("manifest", sig).ok()
    assert "keyless (Sigstore)" in r.out and sigstore_ref.WORKLOAD_IDENTITY in r.out, r
    assert sigstore_ref.WORKLOAD_ISSUER in r.out and "unverified" in r.out, r
    assert "NOT checked" in r.err, r
    j = json.loads(drun("manifest", sig, "--json").ok().out)
    assert j["verified"] is False
    assert j["signer"] == {"method": "sigstore", "key_hint": "", "subject": sigstore_ref.WORKLOAD_IDENTITY,
                           "issuer": sigstore_ref.WORKLOAD_ISSUER}


BAD_ROOTS = {
    "not json": ("{", "not valid JSON"),
    "not a trusted root": (json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}),
                           "not a Sigstore TrustedRoot"),
    "bad key": (json.dumps({"mediaType": sigstore_ref.TRUSTED_ROOT_MEDIA_TYPE,
                            "tlogs": [{"publicKey": {"rawBytes": "AAAA", "validFor": {"start": "2020-01-01T00:00:00Z"}},
                                       "logId": {"keyId": "AAAA"}}]}), "tlogs[0].publicKey.rawBytes"),
    "bad time": (json.dumps({"mediaType": sigstore_ref.TRUSTED_ROOT_MEDIA_TYPE,
                             "certificateAuthorities": [{"certChain": {"certificates": []}}]}), "0 certificates"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROOTS))
def test_malformed_trusted_roots_are_configuration_errors(drun, kl, tmp_path, case):
    text, fragment = BAD_ROOTS[case]
    root = tmp_path / "root.json"
    root.write_text(text)
    sig, _ = kl.bundle("badroot")
    verify(drun, kl, sig, root).fails(2, "trusted root", fragment)


def test_trusted_root_with_tampered_fields(drun, kl, tmp_path):
    """Structurally valid roots whose content is wrong fail verification at the step needing it."""
    sig, _ = kl.bundle("rootfields")
    root = json.loads(kl.root.read_text())
    root["tlogs"][0]["logId"]["keyId"] = base64.b64encode(b"\x01" * 32).decode()
    p = tmp_path / "r1.json"
    p.write_text(json.dumps(root))
    verify(drun, kl, sig, p).fails(1, "at transparency log", "not a transparency log of the trusted root")
    root = json.loads(kl.root.read_text())
    root["ctlogs"] = []
    p.write_text(json.dumps(root))
    verify(drun, kl, sig, p).fails(1, "at SCT")


@pytest.mark.parametrize("mutation", ["bad base64 body", "body not json", "no logId", "kind mismatch",
                                      "huge tlog list", "bad checkpoint"])
def test_malformed_bundles_never_crash(drun, kl, tmp_path, mutation):
    sig, _ = kl.bundle("malformed")
    b = json.loads(sig.read_text())
    e = b["verificationMaterial"]["tlogEntries"][0]
    if mutation == "bad base64 body":
        e["canonicalizedBody"] = "@@@"
    elif mutation == "body not json":
        e["canonicalizedBody"] = base64.b64encode(b"[1,").decode()
        e.pop("inclusionPromise")  # otherwise the SET catches it first
    elif mutation == "no logId":
        del e["logId"]
    elif mutation == "kind mismatch":
        e["kindVersion"]["kind"] = "hashedrekord"
    elif mutation == "huge tlog list":
        b["verificationMaterial"]["tlogEntries"] = [e] * 1000
    elif mutation == "bad checkpoint":
        e["inclusionProof"]["checkpoint"]["envelope"] = "garbage"
        e.pop("inclusionPromise")
    p = tmp_path / "m.sig"
    p.write_text(json.dumps(b))
    verify(drun, kl, p).fails(1)


# ---- real public-good bundles -------------------------------------------------------------------

def public_good_root(tmp_path):
    if not SEEDS.exists():
        if os.environ.get("DRUN_REQUIRE_SIGSTORE_JS") == "1":
            pytest.fail(f"{SEEDS} is missing: run scripts/bootstrap.sh")
        pytest.skip(f"{SEEDS} is missing: run scripts/bootstrap.sh (npm ci in tests/sigstore-js)")
    seeds = json.loads(SEEDS.read_text())
    text = base64.b64decode(seeds["https://tuf-repo-cdn.sigstore.dev"]["targets"]["trusted_root.json"])
    p = tmp_path / "public-good-trusted_root.json"
    p.write_bytes(text)
    return p


def test_public_good_trusted_root_loads(drun, kl, tmp_path):
    root = public_good_root(tmp_path)
    # It loads (no exit 2); our test bundle is simply not from the public-good instance.
    sig, _ = kl.bundle("pg")
    verify(drun, kl, sig, root).fails(1, "keyless verification failed at")


def real_fixtures():
    if not FIXTURES.exists():
        return []
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "model.sig").exists())


REAL = {  # identity, identity provider and ignore paths from the reference project's test scripts
    "default": ("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2", ["ignore-me"]),
}


@pytest.mark.parametrize("version", real_fixtures())
def test_real_reference_bundles_verify(drun, tmp_path, version):
    root = public_good_root(tmp_path)
    meta = json.loads((FIXTURES / "fixtures.json").read_text())[version]
    d = FIXTURES / version
    args = ["verify", d, "--signature", d / "model.sig", "--trusted-root", root, "--identity", meta["identity"],
            "--identity-provider", meta["identity_provider"]]
    for ig in meta.get("ignore_paths", []):
        args += ["--ignore", ig]
    r = drun(*args).ok()
    assert f"signed by sigstore: {meta['identity']}" in r.out, r
    # sigstore-js agrees (an independent verifier of the same real bundle).
    js = subprocess.run(["node", str(HERE.parent / "sigstore-js" / "verify.mjs"), "--bundle", str(d / "model.sig"),
                         "--trusted-root", str(root), "--identity", meta["identity"], "--issuer",
                         meta["identity_provider"]], capture_output=True, text=True, timeout=60)
    assert js.returncode == 0 and js.stdout.strip() == "OK", js
    # The same real bundle with another identity, and with a flipped model byte.
    drun(*args[:6], "--identity", "someone@example.com", *args[8:]).fails(1, "at identity")
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    victim = next(p for p in sorted(copy.iterdir()) if p.is_file() and p.name not in ("model.sig",)
                  and p.name not in meta.get("ignore_paths", []) and p.stat().st_size > 0)
    flip_byte(victim, 0)
    drun("verify", copy, *args[2:]).fails(1, victim.name)


# ---- the same trust on fetch, cache import and serve ---------------------------------------------

def keyless_flags(kl, identity=ID):
    return ["--trusted-root", kl.root, "--identity", identity, "--identity-provider", ISS]


def test_cache_import_and_fetch_take_keyless_trust(drun, drun_bin, kl, tmp_path):
    sig, _ = kl.bundle("store")
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    ks = f"file:{tmp_path / 'node.key'}"
    store = tmp_path / "seed"
    r = drun("cache", "import", kl.model, "--signature", sig, *keyless_flags(kl), "--store", store,
             "--key-source", ks).ok()
    artifact = r.out.split()[-1] if "imported" not in r.out else r.out.split("imported")[1].split()[0]
    drun("cache", "import", kl.model, "--signature", sig, *keyless_flags(kl, "eve@example.com"), "--store",
         tmp_path / "other", "--key-source", ks).fails(1, "at identity")
    # A peer that serves only what this keyless publisher signed.
    pki = PKI(tmp_path / "pki")
    scert, skey = pki.issue("seed", uri="spiffe://cluster/ns/ml/sa/seed")
    ccert, ckey = pki.issue("leecher", uri="spiffe://cluster/ns/ml/sa/loader")

    def policy(identity):
        p = tmp_path / f"policy-{identity}.json"
        p.write_text(json.dumps({
            "roles": {"ml": {"publishers": [{"trusted_root": str(kl.root), "identity": identity,
                                             "identity_provider": ISS}]}},
            "bindings": [{"certificate": {"uri_prefix": "spiffe://cluster/ns/ml/"}, "roles": ["ml"]}]}))
        return p

    def fetch(srv, into):
        return drun("fetch", "--signature", sig, *keyless_flags(kl), "--store", tmp_path / into, "--key-source", ks,
                    "--ca-cert", pki.ca, "--tls-cert", ccert, "--tls-key", ckey, "--peer", srv.addr,
                    "--out", tmp_path / (into + "-out"), timeout=120)

    srv = Serve(drun_bin, store, ks, scert, skey, pki.ca, extra=["--policy", policy(ID)])
    try:
        fetch(srv, "leech").ok()
        assert (tmp_path / "leech-out" / "weights.bin").read_bytes() == (kl.model / "weights.bin").read_bytes()
    finally:
        srv.stop()
    srv = Serve(drun_bin, store, ks, scert, skey, pki.ca, extra=["--policy", policy("eve@example.com")])
    try:
        fetch(srv, "leech2").fails(4)
    finally:
        srv.stop()
    # A policy entry that names a trusted root without an identity is refused when loaded (exit 1,
    # as for every malformed policy file).
    bad = tmp_path / "bad-policy.json"
    bad.write_text(json.dumps({"roles": {"ml": {"publishers": [{"trusted_root": str(kl.root)}]}},
                               "bindings": []}))
    r = drun("serve", "--store", store, "--key-source", ks, "--listen", "127.0.0.1:0", "--tls-cert", scert,
             "--tls-key", skey, "--client-ca", pki.ca, "--policy", bad)
    r.fails(1, "needs \"identity\" and \"identity_provider\"")
    assert artifact


def rekor_v2_bundle(kl, tmp_path, name, tamper=None):
    """A bundle whose entry has Rekor v2's shape: a dsse 0.0.2 body (rekor-tiles' DSSELogEntryV002 in
    protobuf JSON), no integratedTime and no SET, inclusion by proof + checkpoint, time by the TSA."""
    b = kl.inst.sign(kl.payload, set="none", tsa="good", tree_size=1, tree_index=0)
    last = kl.inst.last
    sig = last["signature"]
    body = {"apiVersion": "0.0.2", "kind": "dsse", "spec": {"dsseV002": {
        "payloadHash": {"algorithm": "SHA2_256",
                        "digest": sigstore_ref.b64(hashlib.sha256(kl.payload).digest())},
        "signatures": [{"content": sigstore_ref.b64(sig if tamper != "signature" else sig[:-1] + b"\0"),
                        "verifier": {"keyDetails": "PKIX_ECDSA_P256_SHA_256",
                                     "x509Certificate": {"rawBytes": sigstore_ref.b64(sigstore_ref.der(last["leaf"]))}}}],
    }}}
    raw = sigstore_ref.canonical_json(body)
    root_hash = sigstore_ref.leaf_hash(raw)  # a one-entry tree: the root is the leaf
    e = b["verificationMaterial"]["tlogEntries"][0]
    e["kindVersion"] = {"kind": "dsse", "version": "0.0.2"}
    e.pop("integratedTime", None)
    e["canonicalizedBody"] = sigstore_ref.b64(raw)
    e["inclusionProof"].update(rootHash=sigstore_ref.b64(root_hash), treeSize="1", logIndex="0", hashes=[])
    e["inclusionProof"]["checkpoint"]["envelope"] = kl.inst.checkpoint(1, root_hash)
    p = tmp_path / f"{name}.sig"
    sigstore_ref.write_json(b, p)
    return p


def test_rekor_v2_shaped_entries(drun, kl, tmp_path):
    verify(drun, kl, rekor_v2_bundle(kl, tmp_path, "v2")).ok()
    verify(drun, kl, rekor_v2_bundle(kl, tmp_path, "v2-bad", tamper="signature")).fails(
        1, "at transparency log entry body", "dsse 0.0.2 entry's signature does not match")
