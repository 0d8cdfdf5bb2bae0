"""Self-tests of the test Sigstore instance (sigstore_ref.py); no drun binary needed.

Two kinds of checks:
  * structural, in Python: the leaf's shape, the SCT over tbs_precertificate_bytes, the Merkle proof
    (RFC 9162 verification algorithm), the SET, the checkpoint, the Rekor bodies, the DSSE signature, and
    the RFC 3161 response (with `openssl ts -verify`);
  * cross-checks with sigstore-js (tests/sigstore-js/verify.mjs, one batched node run): every GOOD
    variant verifies; every HOSTILE case is rejected for the intended reason, except those in
    sigstore_ref.SIGSTORE_JS_CANNOT_JUDGE, which sigstore-js (@sigstore/verify 2.1.1) accepts:
      - no_code_signing_eku: sigstore-js never checks keyUsage / extendedKeyUsage;
      - no_time_evidence: sigstore-js trusts integratedTime of an entry with only an inclusion proof;
      - body_other_verifier: sigstore-js does not compare the body's certificate with the bundle's.
    For those the test asserts that sigstore-js accepts, i.e. that the bundle is otherwise sound and the
    named defect is the only one.

sigstore-js is installed by scripts/bootstrap.sh into tests/sigstore-js/node_modules; without it the
sigstore-js tests skip, or fail when DRUN_REQUIRE_SIGSTORE_JS=1.

Run: /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/python/test_sigstore_ref.py
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

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import oms_ref  # noqa: E402
import sigstore_ref as sr  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

JS_DIR = HERE.parent / "sigstore-js"
VERIFY_MJS = JS_DIR / "verify.mjs"

# What sigstore-js says for each hostile case it rejects (a fragment of "<code>: <message>").
JS_EXPECT = {
    "wrong_ca": "CERTIFICATE_ERROR: Failed to verify certificate chain",
    "ca_outside_validfor": "CERTIFICATE_ERROR: Failed to verify certificate chain",
    "expired_at_integrated_time": "not valid or expired at the specified date",
    "missing_sct": "expected 1 SCTs, got 0",
    "forged_sct": "SCT verification failed",
    "sct_unknown_log": "SCT verification failed",
    "forged_set": "TLOG_INCLUSION_PROMISE_ERROR",
    "altered_integrated_time": "TLOG_INCLUSION_PROMISE_ERROR",
    "proof_other_leaf": "calculated root hash does not match inclusion proof",
    "checkpoint_other_key": "invalid checkpoint signature",
    "checkpoint_other_root": "root hash mismatch",
    "body_other_signature": "tlog entry signature mismatch",
    "body_other_payload": "DSSE payload hash mismatch",
    "two_signatures": "content.dsseEnvelope.signatures",
    "no_ca_in_root": "CERTIFICATE_ERROR: Failed to verify certificate chain",
    "tsa_untrusted": "TIMESTAMP_ERROR: timestamp could not be verified",
    "tsa_after_leaf_expiry": "not valid or expired at the specified date",
    "no_tlog_entry": "expected 1 tlog timestamps, got 0",
}

# Verify-side policy checks on a good bundle: (identity, issuer, expected error fragment).
POLICY_CASES = {
    "wrong_identity": ("bob@example.com", sr.DEFAULT_ISSUER, "UNTRUSTED_SIGNER_ERROR"),
    "identity_prefix_only": ("alice@example", sr.DEFAULT_ISSUER, "UNTRUSTED_SIGNER_ERROR"),
    "identity_dot_is_not_a_wildcard": ("alice@example-com", sr.DEFAULT_ISSUER, "UNTRUSTED_SIGNER_ERROR"),
    "wrong_issuer": (sr.DEFAULT_IDENTITY, "https://other-issuer.example.com", "UNTRUSTED_SIGNER_ERROR"),
}


def test_catalogues_are_complete():
    assert set(JS_EXPECT) | set(sr.SIGSTORE_JS_CANNOT_JUDGE) == set(sr.HOSTILE)
    assert not set(JS_EXPECT) & set(sr.SIGSTORE_JS_CANNOT_JUDGE)
    required = {"wrong_ca", "ca_outside_validfor", "expired_at_integrated_time", "missing_sct", "forged_sct",
                "sct_unknown_log", "forged_set", "altered_integrated_time", "proof_other_leaf",
                "checkpoint_other_key", "body_other_signature", "two_signatures", "no_ca_in_root",
                "no_code_signing_eku", "tsa_untrusted", "no_time_evidence"}
    assert required <= set(sr.HOSTILE)
    for name, case in sr.HOSTILE.items():
        assert set(case) == {"sign", "root", "note"} and case["note"], name
    matrix = [n for n, g in sr.GOOD.items() if g["note"] == "matrix"]
    assert len(matrix) == 3 * 2 * 2 * 2


# --------------------------------------------------------------------------------------------------
# fixtures


def _model_payload(tmp):
    model = tmp / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(os.urandom(3000))
    (model / "sub" / "config.json").write_text('{"layers": 2}\n')
    statement = oms_ref.build_statement(str(model), method="files",
                                        ignore_paths=list(oms_ref.DEFAULT_IGNORES))
    return oms_ref.serialize_payload(statement)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sigstore_ref")


@pytest.fixture(scope="module")
def inst(work):
    return sr.Instance(work / "instance")


@pytest.fixture(scope="module")
def payload(work):
    return _model_payload(work)


@pytest.fixture(scope="module")
def root(inst):
    return inst.trusted_root()


def _b64d(s):
    return base64.b64decode(s, validate=True)


def _sign(inst, payload, **opts):
    """(bundle, details) for one signing."""
    b = inst.sign(payload, **opts)
    return b, inst.last


# --------------------------------------------------------------------------------------------------
# structural checks (no node)


@pytest.mark.parametrize("identity", [sr.DEFAULT_IDENTITY, sr.WORKLOAD_IDENTITY])
def test_leaf_shape(inst, payload, identity):
    t0 = sr.utcnow()
    _, d = _sign(inst, payload, identity=identity, issuer="https://issuer.example.com")
    leaf, ica = d["leaf"], d["issuing_ca"]
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == ica.subject
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    assert leaf.not_valid_after - leaf.not_valid_before == datetime.timedelta(minutes=10)
    assert leaf.not_valid_before <= t0 <= leaf.not_valid_before + datetime.timedelta(seconds=30)
    exts = list(leaf.extensions)
    oids = [e.oid.dotted_string for e in exts]
    assert oids == ["2.5.29.15", "2.5.29.37", "2.5.29.14", "2.5.29.35", "2.5.29.17",
                    "1.3.6.1.4.1.57264.1.1", "1.3.6.1.4.1.57264.1.8", "1.3.6.1.4.1.11129.2.4.2"]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    if "://" in identity:
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
        assert san.value.get_values_for_type(x509.RFC822Name) == []
    else:
        assert san.value.get_values_for_type(x509.RFC822Name) == [identity]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ica.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    legacy = leaf.extensions.get_extension_for_oid(sr.OID_ISSUER_LEGACY).value.value
    v2 = leaf.extensions.get_extension_for_oid(sr.OID_ISSUER_V2).value.value
    assert legacy == b"https://issuer.example.com"
    assert v2 == b"\x0c\x1ahttps://issuer.example.com"
    # the chain: leaf <- intermediate <- root, pathlen 0
    ica.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    r = inst.fulcio.root
    r.public_key().verify(ica.signature, ica.tbs_certificate_bytes, ec.ECDSA(ica.signature_hash_algorithm))
    assert ica.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert r.public_key().curve.name == ica.public_key().curve.name == "secp384r1"


@pytest.mark.parametrize("issuer_ext,present", [("v2", {"1.8"}), ("legacy", {"1.1"}), ("both", {"1.1", "1.8"})])
def test_issuer_extension_choice(inst, payload, issuer_ext, present):
    _, d = _sign(inst, payload, issuer_ext=issuer_ext)
    prefix = "1.3.6.1.4.1.57264."
    got = {e.oid.dotted_string[len(prefix):] for e in d["leaf"].extensions
           if e.oid.dotted_string.startswith(prefix)}
    assert got == present


@pytest.mark.parametrize("eku,expected", [("none", None), ("serverAuth", [ExtendedKeyUsageOID.SERVER_AUTH])])
def test_eku_choice(inst, payload, eku, expected):
    _, d = _sign(inst, payload, eku=eku)
    try:
        got = list(d["leaf"].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        got = None
    assert got == expected


def _sct_ok(cert, issuer_cert, ct_pub):
    """Verify the embedded SCT of `cert` independently: python cryptography parses the extension and
    gives the TBS without it (tbs_precertificate_bytes); the signed struct is built here."""
    scts = list(cert.extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps).value)
    assert len(scts) == 1
    s = scts[0]
    assert s.version == x509.certificate_transparency.Version.v1
    assert s.entry_type == x509.certificate_transparency.LogEntryType.PRE_CERTIFICATE
    assert s.extension_bytes == b""
    ts_ms = int(s.timestamp.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
    ikh = hashlib.sha256(issuer_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    tbs = cert.tbs_precertificate_bytes
    data = (b"\x00\x00" + ts_ms.to_bytes(8, "big") + b"\x00\x01" + ikh + len(tbs).to_bytes(3, "big") + tbs
            + b"\x00\x00")
    return s.log_id, sr.ecdsa_verify(ct_pub, s.signature, data)


def test_sct_verifies_over_tbs_precertificate(inst, payload, root):
    _, d = _sign(inst, payload)
    leaf = d["leaf"]
    # all other extensions identical and in the same order as in the TBS the SCT was signed over
    assert leaf.tbs_precertificate_bytes == d["precert_tbs"]
    assert list(leaf.extensions)[-1].oid == sr.OID_SCT_LIST
    lid, ok = _sct_ok(leaf, d["issuing_ca"], inst.ct_key.public_key())
    assert ok
    assert base64.b64encode(lid).decode() == root["ctlogs"][0]["logId"]["keyId"]
    # our TLS parser agrees with cryptography's
    raw = leaf.extensions.get_extension_for_oid(sr.OID_SCT_LIST)
    der_value = raw.value.public_bytes()
    assert der_value[0] == 0x04
    mine = sr.parse_sct_list(der_value[2:] if der_value[1] < 0x80 else der_value[2 + (der_value[1] & 0x7F):])
    assert mine[0]["log_id"] == lid and mine[0]["hash_alg"] == 4 and mine[0]["sig_alg"] == 3


def test_sct_hostile_variants(inst, payload, root):
    _, d = _sign(inst, payload, sct="forged")
    lid, ok = _sct_ok(d["leaf"], d["issuing_ca"], inst.ct_key.public_key())
    assert not ok and base64.b64encode(lid).decode() == root["ctlogs"][0]["logId"]["keyId"]
    _, d = _sign(inst, payload, sct="other_log")
    lid, ok = _sct_ok(d["leaf"], d["issuing_ca"], inst.other_ct_key.public_key())
    assert ok and base64.b64encode(lid).decode() != root["ctlogs"][0]["logId"]["keyId"]
    _, d = _sign(inst, payload, sct="none")
    with pytest.raises(x509.ExtensionNotFound):
        d["leaf"].extensions.get_extension_for_oid(sr.OID_SCT_LIST)


def test_merkle_algorithm_exhaustive():
    for size in range(1, 40):
        leaves = [sr.leaf_hash(b"leaf %d" % i) for i in range(size)]
        root = sr.merkle_root(leaves)
        for index in range(size):
            path = sr.merkle_path(index, leaves)
            assert sr.verify_inclusion(leaves[index], index, size, path, root), (size, index)
            if size > 1:
                other = (index + 1) % size
                assert not sr.verify_inclusion(leaves[other], index, size, path, root)
                if index ^ 1 < size:
                    assert not sr.verify_inclusion(leaves[index], index ^ 1, size, path, root)
                assert not sr.verify_inclusion(leaves[index], index, size, path + [root], root)
                assert not sr.verify_inclusion(leaves[index], index, size, path[:-1], root)
                bad = list(path)
                bad[0] = bytes(32)
                assert not sr.verify_inclusion(leaves[index], index, size, bad, root)


@pytest.mark.parametrize("size,index", [(13, 7), (1, 0), (2, 1), (8, 5), (13, 12), (1000, 777)])
def test_entry_inclusion_proof(inst, payload, size, index):
    b, d = _sign(inst, payload, tree_size=size, tree_index=index)
    e = b["verificationMaterial"]["tlogEntries"][0]
    p = e["inclusionProof"]
    assert (p["logIndex"], p["treeSize"]) == (str(index), str(size))
    body = _b64d(e["canonicalizedBody"])
    leaf_h = hashlib.sha256(b"\x00" + body).digest()
    assert sr.verify_inclusion(leaf_h, index, size, [_b64d(h) for h in p["hashes"]], _b64d(p["rootHash"]))
    if (size, index) == (13, 7):
        # [leaf 6, MTH(leaves 4..5), MTH(leaves 0..3), MTH(leaves 8..12)]: the last is the odd-sized
        # (5-leaf) right edge
        assert len(p["hashes"]) == 4
    b2, _ = _sign(inst, payload, proof="other_leaf", tree_size=size, tree_index=index)
    p2 = b2["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    body2 = _b64d(b2["verificationMaterial"]["tlogEntries"][0]["canonicalizedBody"])
    assert not sr.verify_inclusion(hashlib.sha256(b"\x00" + body2).digest(), index, size,
                                   [_b64d(h) for h in p2["hashes"]], _b64d(p2["rootHash"]))


def _tlog_key(root):
    return serialization.load_der_public_key(_b64d(root["tlogs"][0]["publicKey"]["rawBytes"]))


def _parse_checkpoint(envelope):
    note, sep, sigs = envelope.partition("\n\n")
    assert sep
    lines = note.split("\n")
    sig_lines = [ln for ln in sigs.split("\n") if ln]
    assert sigs.endswith("\n")
    out = []
    for ln in sig_lines:
        dash, name, blob = ln.split(" ")
        assert dash == "\u2014"
        raw = _b64d(blob)
        out.append((name, raw[:4], raw[4:]))
    return (note + "\n").encode("utf-8"), lines, out


@pytest.mark.parametrize("kind", ["dsse", "intoto"])
def test_set_checkpoint_and_body(inst, payload, root, kind):
    b, d = _sign(inst, payload, kind=kind, log_index_offset=1000)
    e = b["verificationMaterial"]["tlogEntries"][0]
    key = _tlog_key(root)
    lid = _b64d(root["tlogs"][0]["logId"]["keyId"])
    assert _b64d(e["logId"]["keyId"]) == lid
    assert lid == hashlib.sha256(_b64d(root["tlogs"][0]["publicKey"]["rawBytes"])).digest()
    assert e["logIndex"] == str(int(e["inclusionProof"]["logIndex"]) + 1000)
    it = int(e["integratedTime"])
    leaf = d["leaf"]
    nb = leaf.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp()
    na = leaf.not_valid_after.replace(tzinfo=datetime.timezone.utc).timestamp()
    assert nb <= it <= na
    # SET over the canonical JSON, rebuilt here from the entry's fields
    set_payload = ('{"body":"%s","integratedTime":%d,"logID":"%s","logIndex":%d}'
                   % (e["canonicalizedBody"], it, lid.hex(), int(e["logIndex"]))).encode()
    assert sr.ecdsa_verify(key, _b64d(e["inclusionPromise"]["signedEntryTimestamp"]), set_payload)
    # checkpoint
    signed, lines, sigs = _parse_checkpoint(e["inclusionProof"]["checkpoint"]["envelope"])
    assert lines[0] == f"{sr.REKOR_HOST} - {inst.tree_id}"
    assert lines[1] == e["inclusionProof"]["treeSize"] and lines[2] == e["inclusionProof"]["rootHash"]
    assert len(sigs) == 1 and sigs[0][0] == sr.REKOR_HOST and sigs[0][1] == lid[:4]
    assert sr.ecdsa_verify(key, sigs[0][2], signed)
    # body: canonical JSON, the fields sigstore-js and the spec read
    body_bytes = _b64d(e["canonicalizedBody"])
    body = json.loads(body_bytes)
    assert json.dumps(body, sort_keys=True, separators=(",", ":")).encode() == body_bytes
    assert (body["kind"], body["apiVersion"]) == (e["kindVersion"]["kind"], e["kindVersion"]["version"])
    sig = _b64d(b["dsseEnvelope"]["signatures"][0]["sig"])
    assert sig == d["signature"]
    ph = hashlib.sha256(payload).hexdigest()
    if kind == "dsse":
        assert e["kindVersion"] == {"kind": "dsse", "version": "0.0.1"}
        spec = body["spec"]
        assert set(spec) == {"envelopeHash", "payloadHash", "signatures"}
        assert spec["payloadHash"] == {"algorithm": "sha256", "value": ph}
        assert [_b64d(s["signature"]) for s in spec["signatures"]] == [sig]
        cert_pem = _b64d(spec["signatures"][0]["verifier"])
    else:
        assert e["kindVersion"] == {"kind": "intoto", "version": "0.0.2"}
        c = body["spec"]["content"]
        assert set(c) == {"envelope", "hash", "payloadHash"}
        assert c["payloadHash"] == {"algorithm": "sha256", "value": ph}
        assert c["envelope"]["payloadType"] == sr.PAYLOAD_TYPE and "payload" not in c["envelope"]
        assert [_b64d(_b64d(s["sig"]).decode()) for s in c["envelope"]["signatures"]] == [sig]
        cert_pem = _b64d(c["envelope"]["signatures"][0]["publicKey"])
    assert x509.load_pem_x509_certificate(cert_pem) == leaf


def test_hostile_tlog_knobs(inst, payload, root):
    key = _tlog_key(root)
    b, _ = _sign(inst, payload, checkpoint="other_key")
    signed, _, sigs = _parse_checkpoint(b["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
                                        ["checkpoint"]["envelope"])
    assert not sr.ecdsa_verify(key, sigs[0][2], signed)
    assert sigs[0][1] == sr.log_id(inst.other_rekor_key.public_key())[:4]
    for opts in ({"set": "forged"}, {"integrated_time_delta": 60}):
        b, d = _sign(inst, payload, **opts)
        e = b["verificationMaterial"]["tlogEntries"][0]
        honest = inst.set_payload(_b64d(e["canonicalizedBody"]), int(e["integratedTime"]), int(e["logIndex"]))
        assert not sr.ecdsa_verify(key, _b64d(e["inclusionPromise"]["signedEntryTimestamp"]), honest), opts
    b, _ = _sign(inst, payload, set="none", proof="none", version="0.1")
    assert "inclusionPromise" not in b["verificationMaterial"]["tlogEntries"][0]
    assert "inclusionProof" not in b["verificationMaterial"]["tlogEntries"][0]
    b, _ = _sign(inst, payload, tlog_entries=0)
    assert b["verificationMaterial"]["tlogEntries"] == []
    b, _ = _sign(inst, payload, body="other_signature")
    body = json.loads(_b64d(b["verificationMaterial"]["tlogEntries"][0]["canonicalizedBody"]))
    assert body["spec"]["signatures"][0]["signature"] != b["dsseEnvelope"]["signatures"][0]["sig"]


@pytest.mark.parametrize("version", ["0.1", "0.2", "0.3"])
def test_bundle_versions_and_dsse(inst, payload, version):
    b, d = _sign(inst, payload, version=version)
    assert b["mediaType"] == sr.BUNDLE_MEDIA_TYPES[version]
    vm = b["verificationMaterial"]
    if version == "0.3":
        assert set(vm) == {"certificate", "tlogEntries"}
        leaf_der = _b64d(vm["certificate"]["rawBytes"])
    else:
        assert set(vm) == {"x509CertificateChain", "tlogEntries"}
        certs = vm["x509CertificateChain"]["certificates"]
        assert len(certs) == 1
        leaf_der = _b64d(certs[0]["rawBytes"])
    leaf = x509.load_der_x509_certificate(leaf_der)
    env = b["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json" and _b64d(env["payload"]) == payload
    assert len(env["signatures"]) == 1 and env["signatures"][0]["keyid"] == ""
    oms_ref.verify_bytes(leaf.public_key(), _b64d(env["signatures"][0]["sig"]),
                         oms_ref.pae(env["payloadType"], payload))
    b, _ = _sign(inst, payload, version="0.2", include_intermediate=True)
    assert len(b["verificationMaterial"]["x509CertificateChain"]["certificates"]) == 2
    b, _ = _sign(inst, payload, two_signatures=True)
    assert len(b["dsseEnvelope"]["signatures"]) == 2


def test_trusted_root_shape(inst, root):
    assert root["mediaType"] == "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
    ca = root["certificateAuthorities"][0]
    chain = [x509.load_der_x509_certificate(_b64d(c["rawBytes"])) for c in ca["certChain"]["certificates"]]
    assert chain == [inst.fulcio.intermediate, inst.fulcio.root]
    assert ca["subject"] == {"organization": sr.ORG, "commonName": "sigstore-ref"} and ca["uri"]
    assert ca["validFor"]["start"].endswith("Z") and "end" not in ca["validFor"]
    for log in root["tlogs"] + root["ctlogs"]:
        raw = _b64d(log["publicKey"]["rawBytes"])
        assert _b64d(log["logId"]["keyId"]) == hashlib.sha256(raw).digest()
        assert log["publicKey"]["keyDetails"] == "PKIX_ECDSA_P256_SHA_256" and log["hashAlgorithm"] == "SHA2_256"
        assert log["baseUrl"].startswith("https://")
    tsa = root["timestampAuthorities"][0]
    tchain = [x509.load_der_x509_certificate(_b64d(c["rawBytes"])) for c in tsa["certChain"]["certificates"]]
    assert tchain == [inst.tsa.leaf, inst.tsa.root]
    eku = inst.tsa.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    t = inst.trusted_root(no_ca=True, no_tsa=True,
                          ca_valid_for=(datetime.timedelta(days=-2), datetime.timedelta(days=-1)))
    assert t["certificateAuthorities"] == [] and t["timestampAuthorities"] == []
    t = inst.trusted_root(ca_valid_for=(datetime.datetime(2020, 1, 1), datetime.datetime(2021, 1, 1)))
    assert t["certificateAuthorities"][0]["validFor"] == {"start": "2020-01-01T00:00:00Z",
                                                          "end": "2021-01-01T00:00:00Z"}


def test_tsa_response_verifies_with_openssl(inst, payload, work):
    b, d = _sign(inst, payload, tsa="good")
    ts = b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"]
    assert len(ts) == 1
    resp = _b64d(ts[0]["signedTimestamp"])
    path = work / "resp.tsr"
    path.write_bytes(resp)
    digest = hashlib.sha256(d["signature"]).hexdigest()

    def verify(tsa, dig):
        return subprocess.run(["openssl", "ts", "-verify", "-digest", dig, "-in", str(path),
                               "-CAfile", tsa.root_path, "-untrusted", tsa.cert_path],
                              capture_output=True, text=True)
    p = verify(inst.tsa, digest)
    assert p.returncode == 0 and "Verification: OK" in p.stdout, p.stdout + p.stderr
    # over the signature bytes, not over the payload or the PAE
    assert verify(inst.tsa, hashlib.sha256(payload).hexdigest()).returncode != 0
    b, _ = _sign(inst, payload, tsa="untrusted")
    path.write_bytes(_b64d(b["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]
                           ["signedTimestamp"]))
    assert verify(inst.tsa, hashlib.sha256(inst.last["signature"]).hexdigest()).returncode != 0
    assert verify(inst.untrusted_tsa, hashlib.sha256(inst.last["signature"]).hexdigest()).returncode == 0
    # the untrusted TSA is a twin: same names and leaf serial, only the keys differ
    assert inst.untrusted_tsa.leaf.serial_number == inst.tsa.leaf.serial_number
    assert inst.untrusted_tsa.leaf.issuer == inst.tsa.leaf.issuer


def test_option_errors(inst, payload, work):
    with pytest.raises(sr.SigstoreRefError):
        inst.sign(payload, bogus=1)
    with pytest.raises(sr.SigstoreRefError):
        inst.sign(payload, kind="hashedrekord")
    with pytest.raises(sr.SigstoreRefError):
        inst.sign(payload, tree_size=4, tree_index=4)
    with pytest.raises(sr.SigstoreRefError):
        inst.trusted_root(bogus=True)
    old = sr.Instance(work / "old", now=datetime.datetime(2020, 5, 1, 12, 0, 0))
    b = old.sign(payload)      # a fixed clock works without a TSA ...
    assert b["verificationMaterial"]["tlogEntries"][0]["integratedTime"] == str(
        int(datetime.datetime(2020, 5, 1, 12, 0, tzinfo=datetime.timezone.utc).timestamp()))
    with pytest.raises(sr.SigstoreRefError, match="real clock"):
        old.sign(payload, tsa="good")   # ... but openssl ts stamps with the real time


# --------------------------------------------------------------------------------------------------
# sigstore-js cross-checks


def _node():
    for cand in (os.environ.get("NODE"), "/usr/bin/node", shutil.which("node")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _require_js():
    node = _node()
    missing = None
    if not (JS_DIR / "node_modules" / "@sigstore" / "verify").is_dir():
        missing = f"{JS_DIR / 'node_modules'} lacks @sigstore/verify"
    elif node is None:
        missing = "no node executable"
    if missing:
        msg = (f"sigstore-js is not available ({missing}): run scripts/bootstrap.sh (it installs "
               f"tests/sigstore-js/node_modules with npm ci) to cross-check with sigstore-js")
        if os.environ.get("DRUN_REQUIRE_SIGSTORE_JS") == "1":
            pytest.fail("DRUN_REQUIRE_SIGSTORE_JS=1 but " + msg)
        pytest.skip(msg)
    return node


def _run_batch(node, jobs):
    p = subprocess.run([node, str(VERIFY_MJS), "--batch"], input=json.dumps(jobs), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    assert [r["job"] for r in lines] == list(range(len(jobs))), p.stdout
    return lines


@pytest.fixture(scope="module")
def js(work, inst, payload):
    """Every GOOD variant, HOSTILE case and policy case, verified in one node run: name -> result."""
    node = _require_js()
    d = work / "js"
    d.mkdir()
    default_root = str(d / "trusted_root.json")
    inst.write_trusted_root(default_root)
    jobs, names = [], []

    def add(name, bundle, root_tweaks, identity, issuer):
        bp = d / f"{name}.bundle.json"
        sr.write_json(bundle, bp)
        tr = default_root
        if root_tweaks:
            tr = str(d / f"{name}.trusted_root.json")
            inst.write_trusted_root(tr, **root_tweaks)
        jobs.append({"bundle": str(bp), "trustedRoot": tr, "identity": identity, "issuer": issuer})
        names.append(name)

    for name, g in sr.GOOD.items():
        add("good-" + name, inst.sign(payload, g["identity"], g["issuer"], **g["sign"]), g["root"],
            g["identity"], g["issuer"])
    for name, h in sr.HOSTILE.items():
        add("hostile-" + name, inst.sign(payload, **h["sign"]), h["root"], sr.DEFAULT_IDENTITY, sr.DEFAULT_ISSUER)
    good = inst.sign(payload)
    for name, (identity, issuer, _) in POLICY_CASES.items():
        add("policy-" + name, good, {}, identity, issuer)
    tampered = json.loads(json.dumps(good))
    tampered["dsseEnvelope"]["payload"] = base64.b64encode(payload + b" ").decode()
    add("tampered-payload", tampered, {}, sr.DEFAULT_IDENTITY, sr.DEFAULT_ISSUER)
    results = dict(zip(names, _run_batch(node, jobs)))
    # Once, on a CI machine, sigstore-js rejected one good TSA variant ("timestamp could not be
    # verified") that 13 others in the same run passed; 1,500 signings of that variant and 12,000
    # `openssl ts` responses checked with @sigstore/core here never reproduced it. Such a variant is
    # signed afresh (new keys, signature, nonce) and checked once more: a rejection that repeats is
    # a real disagreement and fails; the first rejected bundle is kept next to the others.
    for name, r in list(results.items()):
        g = sr.GOOD.get(name.removeprefix("good-"))
        if r["ok"] or g is None or g["sign"].get("tsa") != "good" or "TIMESTAMP_ERROR" not in r.get("error", ""):
            continue
        shutil.copy(d / f"{name}.bundle.json", d / f"{name}.rejected.bundle.json")
        jobs, names = [], []
        add(name, inst.sign(payload, g["identity"], g["issuer"], **g["sign"]), g["root"], g["identity"], g["issuer"])
        again = _run_batch(node, jobs)[0]
        print(f"sigstore-js rejected {name} ({r['error']}), kept as {d / (name + '.rejected.bundle.json')}; "
              f"signed afresh: {'accepted' if again['ok'] else again['error']}")
        results[name] = again
    return results, {"dir": d, "root": default_root, "good": good, "node": node}


@pytest.mark.parametrize("name", sorted(sr.GOOD))
def test_js_accepts_good(js, name):
    r = js[0]["good-" + name]
    assert r["ok"], f"sigstore-js rejects good variant {name} ({sr.GOOD[name]}): {r.get('error')}"


@pytest.mark.parametrize("name", sorted(JS_EXPECT))
def test_js_rejects_hostile(js, name):
    r = js[0]["hostile-" + name]
    assert not r["ok"], f"sigstore-js accepts hostile case {name}: {sr.HOSTILE[name]['note']}"
    assert JS_EXPECT[name] in r["error"], f"{name}: rejected for another reason: {r['error']}"


@pytest.mark.parametrize("name", sorted(sr.SIGSTORE_JS_CANNOT_JUDGE))
def test_js_cannot_judge_but_bundle_is_otherwise_sound(js, name):
    r = js[0]["hostile-" + name]
    assert r["ok"], (f"sigstore-js now rejects {name} ({r.get('error')}): move it from "
                     f"SIGSTORE_JS_CANNOT_JUDGE to JS_EXPECT")


@pytest.mark.parametrize("name", sorted(POLICY_CASES))
def test_js_policy(js, name):
    r = js[0]["policy-" + name]
    assert not r["ok"] and POLICY_CASES[name][2] in r["error"], r


def test_js_tampered_payload(js):
    r = js[0]["tampered-payload"]
    assert not r["ok"] and "TLOG_BODY_ERROR" in r["error"], r


def test_verify_mjs_single_mode(js):
    _, ctx = js
    bp = ctx["dir"] / "single.json"
    sr.write_json(ctx["good"], bp)
    base = [ctx["node"], str(VERIFY_MJS), "--bundle", str(bp), "--trusted-root", ctx["root"],
            "--issuer", sr.DEFAULT_ISSUER, "--identity"]
    p = subprocess.run(base + [sr.DEFAULT_IDENTITY], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout + p.stderr
    p = subprocess.run(base + ["bob@example.com"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "UNTRUSTED_SIGNER_ERROR" in p.stdout and "FAIL" in p.stderr, p.stdout + p.stderr
    p = subprocess.run([ctx["node"], str(VERIFY_MJS), "--bundle", str(bp)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "usage" in p.stderr
