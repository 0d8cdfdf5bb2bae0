#!/usr/bin/python3
"""sigstore_ref: an independent, test-only Sigstore instance that makes *keyless* bundles offline.

It plays every Sigstore service a keyless OMS bundle depends on, so that drun's offline verifier can be
fed good bundles and deliberately hostile ones together with the `trusted_root.json` that vouches for
them:

    Fulcio-like CA     self-signed root (P-384) -> intermediate (P-384, pathlen 0) -> a fresh P-256 leaf per
                       signing, 10 minutes valid, empty subject, SAN (e-mail or URI), OIDC issuer extensions
    CT log (RFC 6962)  an embedded SCT over the precertificate-equivalent TBS
    Rekor v1-like log  dsse v0.0.1 / intoto v0.0.2 entry: SET, RFC 6962 inclusion proof, signed checkpoint
    TSA (RFC 3161)     `openssl ts -reply` (an independent implementation) stamping the DSSE signature

Written from the formats (Sigstore protobuf-specs, RFC 6962/9162, RFC 3161, C2SP signed notes), not from
drun's code nor from another project's. Only for tests: clarity over speed, no hardening.

Library use:
    inst = Instance(workdir, now=None)             # all keys/certs; now=None: the real UTC clock
    root = inst.trusted_root(**tweaks)             # the TrustedRoot JSON dict
    inst.write_trusted_root(path, **tweaks)
    bundle = inst.sign(payload, identity="alice@example.com", issuer="https://issuer.example.com", **opts)
    write_json(bundle, path)
    inst.last                                      # details of the last sign() (leaf cert, body, tree...)
    HOSTILE[name] = dict(sign={opts}, root={tweaks}, note="what is wrong")
    GOOD[name]    = dict(sign={opts}, identity=..., issuer=..., root={}, note=...)
    SIGSTORE_JS_CANNOT_JUDGE[name] = "why sigstore-js 2.1.1 accepts this hostile case"

The payload is any bytes (an OMS in-toto statement: oms_ref.serialize_payload(oms_ref.build_statement(
model, method=...))); it is wrapped in a DSSE envelope of type application/vnd.in-toto+json and signed
with ECDSA P-256/SHA-256 over the DSSE PAE (oms_ref.pae).

sign() options (defaults first):
    version      "0.3" | "0.2" | "0.1"     bundle media type; 0.3 carries verificationMaterial.certificate,
                                           0.2/0.1 an x509CertificateChain (leaf [+ intermediate])
    include_intermediate  False | True     0.1/0.2 only: append the intermediate to the chain
    kind         "dsse" | "intoto"         Rekor entry kind (dsse v0.0.1 / intoto v0.0.2)
    ca           "trusted" | "untrusted"   untrusted: a CA with the same names but other keys, not in the root
    eku          "codeSigning" | "serverAuth" | "none"
    issuer_ext   "both" | "v2" | "legacy"  1.3.6.1.4.1.57264.1.8 (DER UTF8String) and/or .1.1 (raw ASCII)
    leaf_validity  None | (not_before, not_after)   datetimes, or timedeltas relative to t;
                                           default (t-5s, t-5s+10min)
    at           None | datetime           the signing time t (default: the instance's now)
    sct          "good" | "none" | "forged" | "other_log"
    set          "good" | "none" | "forged"   (the SET / inclusionPromise)
    proof        "good" | "none" | "other_leaf"
    checkpoint   "good" | "other_key" | "other_root" | "none"
    checkpoint_extra  None | ["Timestamp: 123", ...]   extra note lines after the root hash (Rekor v1 wrote
                                           a "Timestamp: <ns>" line in some versions)
    body         "good" | "other_signature" | "other_payload" | "other_verifier"
    integrated_time   None | int | datetime | timedelta   explicit integratedTime (unix seconds, a
                                           datetime, or relative to t), with a consistent SET
    integrated_time_delta  0 | int         seconds added to integratedTime AFTER the SET was signed
    tlog_entries 1 | 0
    tree_size    13, tree_index 7          the RFC 6962 tree the entry sits in (13 leaves: odd right edge)
    log_index_offset  0 | int              entry logIndex = tree_index + offset (Rekor shards: the entry's
                                           logIndex is global, the proof's is the index in the shard's tree)
    tsa          "none" | "good" | "untrusted"
    two_signatures  False | True           a second signature in the DSSE envelope

trusted_root() tweaks: ca_valid_for=(start, end|None), no_ca=True, no_tsa=True,
    tlog_valid_for=(start, end|None), ctlog_valid_for=(start, end|None), tsa_valid_for=(start, end|None);
    start/end are datetimes or timedeltas relative to the instance's now.

Times are naive UTC datetimes (aware ones are converted). HOSTILE and GOOD use timedeltas only, so
their cases hold for any Instance, except those with a TSA, which need Instance(now=None) (see below).

The untrusted twins (ca="untrusted", sct="other_log", checkpoint="other_key", tsa="untrusted") copy the
names of the trusted services (and, for the TSA, the leaf's serial number) but have their own keys, so
only signatures tell them apart. inst.last after sign(): leaf, leaf_key, precert_tbs, scts, issuing_ca,
signature, envelope, options, and with a tlog entry body, tree_leaves, root_hash, path,
integrated_time, log_index, set_payload, set; with a TSA tsa_response.

Formats, and what sigstore-js (@sigstore/verify 2.1.1, @sigstore/bundle 3.1.0) checks of them:
  * Bundle: v0.1 needs an inclusionPromise on every entry; v0.2/v0.3 need an inclusionProof with a
    checkpoint on every entry; v0.3 must not use x509CertificateChain; the DSSE envelope must hold
    exactly one signature. Only the first certificate of a chain is used (the trusted root supplies
    the rest). A v0.1 entry with a proof but no checkpoint crashes sigstore-js (a TypeError: reject).
  * Rekor bodies are canonical JSON (sorted keys, no whitespace). kindVersion must equal
    (body.kind, body.apiVersion). For dsse v0.0.1 sigstore-js compares only spec.signatures (exactly
    1, .signature == base64 of the envelope's signature) and spec.payloadHash.value (hex sha256 of the
    payload); for intoto v0.0.2 only spec.content.envelope.signatures (exactly 1, .sig ==
    base64(base64(signature))) and spec.content.payloadHash.value. It does NOT compare envelopeHash /
    content.hash, nor the verifier / publicKey (base64 of the PEM leaf) with the bundle's certificate.
    Here envelopeHash / content.hash = sha256 of the compact JSON envelope
    {"payload","payloadType","signatures":[{"sig","keyid"}]} (Rekor hashes the envelope as submitted,
    which no client can reproduce; nobody checks it).
  * SET = ECDSA (base64 DER) over canonical JSON {"body": canonicalizedBody (base64 text),
    "integratedTime": int, "logID": hex log id, "logIndex": int (the entry's logIndex, not the
    proof's)}; the key is the tlog whose logId equals the entry's logId and whose validFor holds
    integratedTime.
  * Inclusion proof: leaf = SHA-256(0x00 || canonicalizedBody), RFC 9162 path check with the proof's
    logIndex and treeSize; hashes lowest level first.
  * Checkpoint: "<origin>\n<size>\n<b64 root>\n[other lines\n]" + "\n" + "\u2014 <name> <b64(hint4||sig)>\n";
    the signed bytes are everything up to and including the first "\n" of the "\n\n" separator;
    hint = first 4 bytes of the log id. sigstore-js finds the key by hint alone among the tlogs valid
    at integratedTime (not by the entry's logId), requires every signature line to verify, checks root
    hash == proof rootHash, and checks neither the origin nor the size.
  * Time: every entry yields the timestamp integratedTime, whether a SET signs it or only a proof is
    present (then nothing signs it: see SIGSTORE_JS_CANNOT_JUDGE["no_time_evidence"]); every RFC 3161
    timestamp yields its genTime; the leaf chain must be valid at every one of them, the CA's validFor
    must hold each, and any timestamp that fails to verify rejects the bundle even when another
    succeeds. At least one tlog entry is required (tlogThreshold 1).
  * The RFC 3161 timestamp is over the raw DSSE signature bytes (messageImprint = sha256(sig)); the
    TSA is found by the SignerInfo's issuer and serial number among timestampAuthorities valid at
    genTime, its certChain[0] is the signer, the rest its trust anchors.
  * SCT: issuer_key_hash = sha256 of the issuer's DER SPKI (the certificate after the leaf in the
    verified path, i.e. the intermediate); TBS = the leaf's TBS with the SCT extension removed (wherever
    it is; here it is last). The CT log is found by the SCT's log id, and its validFor must hold the
    SCT's timestamp. At least one verified SCT is required (ctlogThreshold 1).
  * Identity: the SAN (URI first, else rfc822Name) and the issuer from 1.3.6.1.4.1.57264.1.8 when
    present, else 1.1. sigstore-js ignores keyUsage / extendedKeyUsage.

TSA time: `openssl ts -reply` stamps with the real clock and has no option to set the time, so an
Instance with a fixed `now` far from the real clock cannot make tsa="good" bundles (sign() raises unless
you pass leaf_validity explicitly). With now=None everything is relative to the real clock.
"""

import base64
import datetime
import hashlib
import json
import os
import secrets
import subprocess

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import oms_ref

PAYLOAD_TYPE = oms_ref.PAYLOAD_TYPE
TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
BUNDLE_MEDIA_TYPES = {
    "0.1": "application/vnd.dev.sigstore.bundle+json;version=0.1",
    "0.2": "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "0.3": "application/vnd.dev.sigstore.bundle.v0.3+json",
}
OID_ISSUER_LEGACY = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
TSA_POLICY_OID = "1.3.6.1.4.1.57264.2"

ORG = "sigstore-ref.test"
FULCIO_URI = "https://fulcio.sigstore-ref.test"
REKOR_HOST = "rekor.sigstore-ref.test"
REKOR_URL = "https://" + REKOR_HOST
CTLOG_URL = "https://ctfe.sigstore-ref.test/test"
TSA_URI = "https://tsa.sigstore-ref.test/api/v1/timestamp"

DEFAULT_IDENTITY = "alice@example.com"
DEFAULT_ISSUER = "https://issuer.example.com"
WORKLOAD_IDENTITY = "https://github.com/org/repo/.github/workflows/release.yml@refs/tags/v1"
WORKLOAD_ISSUER = "https://token.actions.githubusercontent.com"

LEAF_LIFETIME = datetime.timedelta(minutes=10)
LEAF_BACKDATE = datetime.timedelta(seconds=5)

DEFAULT_SIGN = {
    "version": "0.3",
    "include_intermediate": False,
    "kind": "dsse",
    "ca": "trusted",
    "eku": "codeSigning",
    "issuer_ext": "both",
    "leaf_validity": None,
    "at": None,
    "sct": "good",
    "set": "good",
    "proof": "good",
    "checkpoint": "good",
    "checkpoint_extra": None,
    "body": "good",
    "integrated_time": None,
    "integrated_time_delta": 0,
    "tlog_entries": 1,
    "tree_size": 13,
    "tree_index": 7,
    "log_index_offset": 0,
    "tsa": "none",
    "two_signatures": False,
}
SIGN_CHOICES = {
    "version": tuple(BUNDLE_MEDIA_TYPES),
    "kind": ("dsse", "intoto"),
    "ca": ("trusted", "untrusted"),
    "eku": ("codeSigning", "serverAuth", "none"),
    "issuer_ext": ("both", "v2", "legacy"),
    "sct": ("good", "none", "forged", "other_log"),
    "set": ("good", "none", "forged"),
    "proof": ("good", "none", "other_leaf"),
    "checkpoint": ("good", "other_key", "other_root", "none"),
    "body": ("good", "other_signature", "other_payload", "other_verifier"),
    "tlog_entries": (0, 1),
    "tsa": ("none", "good", "untrusted"),
}
ROOT_TWEAKS = ("ca_valid_for", "no_ca", "no_tsa", "tlog_valid_for", "ctlog_valid_for", "tsa_valid_for")


class SigstoreRefError(Exception):
    """A request the test instance cannot honour (bad option, TSA time impossible...)."""


# --------------------------------------------------------------------------------------------------
# encodings


def b64(data):
    return base64.b64encode(data).decode("ascii")


def canonical_json(obj):
    """Rekor-style canonical JSON bytes: sorted keys, no whitespace (RFC 8785 for our ASCII content)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def rfc3339(dt):
    """Naive-UTC datetime -> RFC 3339 with Z (protobuf Timestamp JSON)."""
    return dt.replace(microsecond=0).isoformat() + "Z"


def utcnow():
    return datetime.datetime.utcnow().replace(microsecond=0)


def _naive_utc(dt):
    if dt.tzinfo is not None:
        dt = dt.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return dt.replace(microsecond=0)


def _unix(dt):
    return int(dt.replace(tzinfo=datetime.timezone.utc).timestamp())


def _der_len(n):
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_octet_string(data):
    return b"\x04" + _der_len(len(data)) + data


def der_utf8_string(text):
    data = text.encode("utf-8")
    return b"\x0c" + _der_len(len(data)) + data


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def spki_der(public_key):
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def log_id(public_key):
    """Sigstore log id / CT log id: SHA-256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der(public_key)).digest()


def ecdsa_sign(key, data):
    return oms_ref.sign_bytes(key, data)


def ecdsa_verify(public_key, sig, data):
    """True when `sig` (DER ECDSA) verifies over `data` with the curve's hash."""
    try:
        public_key.verify(sig, data, ec.ECDSA(oms_ref.ecdsa_hash_for_curve(public_key.curve)))
        return True
    except InvalidSignature:
        return False


# --------------------------------------------------------------------------------------------------
# RFC 6962 / RFC 9162 Merkle trees


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n):
    """The largest power of two smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def merkle_root(hashes_):
    """MTH over a list of leaf hashes (RFC 6962 2.1)."""
    n = len(hashes_)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashes_[0]
    k = _split(n)
    return node_hash(merkle_root(hashes_[:k]), merkle_root(hashes_[k:]))


def merkle_path(index, hashes_):
    """The audit path PATH(index, D[n]) of RFC 6962 2.1.1, lowest level first."""
    n = len(hashes_)
    if n <= 1:
        return []
    k = _split(n)
    if index < k:
        return merkle_path(index, hashes_[:k]) + [merkle_root(hashes_[k:])]
    return merkle_path(index - k, hashes_[k:]) + [merkle_root(hashes_[:k])]


def verify_inclusion(leaf_h, index, size, path, root):
    """RFC 9162 2.1.3.2: does `path` prove leaf hash `leaf_h` at `index` in a tree of `size` with `root`?"""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_h
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


# --------------------------------------------------------------------------------------------------
# RFC 6962 SCTs


def sct_signed_data(timestamp_ms, issuer_key_hash, tbs, extensions=b""):
    """The digitally-signed struct of an SCT for a precert_entry (RFC 6962 3.2)."""
    return (b"\x00"                       # sct_version v1
            + b"\x00"                     # signature_type certificate_timestamp
            + timestamp_ms.to_bytes(8, "big")
            + (1).to_bytes(2, "big")      # entry_type precert_entry
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big") + tbs
            + len(extensions).to_bytes(2, "big") + extensions)


def sct_struct(log_id_bytes, timestamp_ms, signature, extensions=b""):
    """A serialized SignedCertificateTimestamp (version 0, sha256 + ecdsa)."""
    return (b"\x00" + log_id_bytes + timestamp_ms.to_bytes(8, "big")
            + len(extensions).to_bytes(2, "big") + extensions
            + b"\x04\x03" + len(signature).to_bytes(2, "big") + signature)


def sct_list(scts):
    inner = b"".join(len(s).to_bytes(2, "big") + s for s in scts)
    return len(inner).to_bytes(2, "big") + inner


def parse_sct_list(data):
    """TLS SignedCertificateTimestampList -> [dict(log_id, timestamp, extensions, hash_alg, sig_alg,
    signature)]."""
    total = int.from_bytes(data[:2], "big")
    if total != len(data) - 2:
        raise SigstoreRefError("SCT list length mismatch")
    out, pos = [], 2
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 2], "big")
        s = data[pos + 2:pos + 2 + n]
        pos += 2 + n
        ext_len = int.from_bytes(s[41:43], "big")
        p = 43 + ext_len
        sig_len = int.from_bytes(s[p + 2:p + 4], "big")
        if s[0] != 0 or len(s) != p + 4 + sig_len:
            raise SigstoreRefError("malformed SCT")
        out.append({"log_id": s[1:33], "timestamp": int.from_bytes(s[33:41], "big"),
                    "extensions": s[43:p], "hash_alg": s[p], "sig_alg": s[p + 1],
                    "signature": s[p + 4:]})
    return out


# --------------------------------------------------------------------------------------------------
# certificates


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(digital_signature=False, key_cert_sign=False, crl_sign=False):
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False,
                         decipher_only=False)


def _ca_cert(cn, key, issuer, not_before, not_after, path_length=None, eku=None):
    """A CA certificate; issuer = (cert, key) or None for self-signed. Signed with SHA-384."""
    pub = key.public_key()
    if issuer is None:
        issuer_name, signer, issuer_pub = _name(cn), key, pub
    else:
        issuer_name, signer, issuer_pub = issuer[0].subject, issuer[1], issuer[1].public_key()
    b = (x509.CertificateBuilder()
         .subject_name(_name(cn))
         .issuer_name(issuer_name)
         .public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(_ku(key_cert_sign=True, crl_sign=True), critical=True)
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(signer, hashes.SHA384())


class _CA:
    """A Fulcio-like root + intermediate (both P-384)."""

    def __init__(self, base):
        nb, na = base - datetime.timedelta(days=365), base + datetime.timedelta(days=3650)
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = _ca_cert("sigstore-ref", self.root_key, None, nb, na)
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = _ca_cert("sigstore-ref-intermediate", self.intermediate_key,
                                     (self.root, self.root_key), nb, na, path_length=0,
                                     eku=[ExtendedKeyUsageOID.CODE_SIGNING])
        self.valid_from = nb


class _TSA:
    """An RFC 3161 TSA: a self-signed root (P-384) and a leaf (P-256, EKU timeStamping critical), whose
    responses `openssl ts -reply` makes with a config written into `directory`. `twin_of`: another _TSA
    whose names and leaf serial number this one copies (with its own keys), so that only signatures tell
    them apart."""

    def __init__(self, base, directory, twin_of=None):
        nb, na = base - datetime.timedelta(days=365), base + datetime.timedelta(days=3650)
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = _ca_cert("sigstore-ref-tsa-root", self.root_key, None, nb, na)
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        pub = self.leaf_key.public_key()
        self.leaf = (x509.CertificateBuilder()
                     .subject_name(_name("sigstore-ref-tsa"))
                     .issuer_name(self.root.subject)
                     .public_key(pub)
                     .serial_number(twin_of.leaf.serial_number if twin_of else x509.random_serial_number())
                     .not_valid_before(nb)
                     .not_valid_after(na)
                     .add_extension(_ku(digital_signature=True), critical=True)
                     .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                     .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                     .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()),
                                    critical=False)
                     .sign(self.root_key, hashes.SHA384()))
        self.valid_from = nb
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.key_path = os.path.join(directory, "tsa.key")
        oms_ref.write_private_key(self.key_path, self.leaf_key)
        self.cert_path = os.path.join(directory, "tsa.pem")
        self.root_path = os.path.join(directory, "tsa-root.pem")
        with open(self.cert_path, "wb") as f:
            f.write(pem(self.leaf))
        with open(self.root_path, "wb") as f:
            f.write(pem(self.root))
        self.serial_path = os.path.join(directory, "serial")
        with open(self.serial_path, "w") as f:
            f.write("01\n")
        self.config_path = os.path.join(directory, "ts.cnf")
        with open(self.config_path, "w") as f:
            f.write("[ tsa ]\ndefault_tsa = tsa_config\n\n[ tsa_config ]\n"
                    f"serial = {self.serial_path}\n"
                    "signer_digest = sha256\n"
                    f"default_policy = {TSA_POLICY_OID}\n"
                    "digests = sha256, sha384, sha512\n"
                    "accuracy = secs:1\n"
                    "ordering = no\n"
                    "tsa_name = no\n"
                    "ess_cert_id_chain = no\n"
                    "ess_cert_id_alg = sha256\n")
        self.count = 0

    def timestamp(self, message):
        """DER TimeStampResp (as `openssl ts -reply` writes it) over sha256(message)."""
        self.count += 1
        req = os.path.join(self.dir, f"req{self.count}.tsq")
        resp = os.path.join(self.dir, f"resp{self.count}.tsr")
        digest = hashlib.sha256(message).hexdigest()
        env = dict(os.environ, OPENSSL_CONF=self.config_path)
        for args in (["openssl", "ts", "-query", "-digest", digest, "-sha256", "-cert", "-out", req],
                     ["openssl", "ts", "-reply", "-config", self.config_path, "-queryfile", req,
                      "-inkey", self.key_path, "-signer", self.cert_path, "-out", resp]):
            p = subprocess.run(args, capture_output=True, text=True, env=env)
            if p.returncode != 0 or (args[2] == "-reply" and not os.path.exists(resp)):
                raise SigstoreRefError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr}")
        with open(resp, "rb") as f:
            return f.read()


# --------------------------------------------------------------------------------------------------
# the instance


class Instance:
    """A whole test Sigstore: CA, CT log, transparency log, TSA, and an untrusted twin of each."""

    def __init__(self, workdir, now=None):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._fixed_now = _naive_utc(now) if now is not None else None
        base = self.now()
        self.base = base
        self.fulcio = _CA(base)
        self.untrusted_fulcio = _CA(base)      # same names, other keys: not in the trusted root
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.other_ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        self.other_rekor_key = ec.generate_private_key(ec.SECP256R1())
        self.tree_id = secrets.randbelow(1 << 62) + (1 << 60)
        self.origin = f"{REKOR_HOST} - {self.tree_id}"
        self.log_valid_from = base - datetime.timedelta(days=365)
        self.tsa = _TSA(base, os.path.join(self.workdir, "tsa"))
        # same names and leaf serial as the trusted TSA, other keys: not in the trusted root
        self.untrusted_tsa = _TSA(base, os.path.join(self.workdir, "tsa-untrusted"), twin_of=self.tsa)
        self.last = None

    def now(self):
        return self._fixed_now or utcnow()

    # ---- trusted root

    def _at(self, x, ref=None):
        """A datetime, or a timedelta relative to `ref` (default: now)."""
        if isinstance(x, datetime.timedelta):
            return (ref or self.now()) + x
        return _naive_utc(x)

    def _valid_for(self, start, end=None):
        vf = {"start": rfc3339(self._at(start))}
        if end is not None:
            vf["end"] = rfc3339(self._at(end))
        return vf

    def _log_instance(self, url, key, valid_for):
        return {
            "baseUrl": url,
            "hashAlgorithm": "SHA2_256",
            "publicKey": {
                "rawBytes": b64(spki_der(key.public_key())),
                "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                "validFor": self._valid_for(*valid_for),
            },
            "logId": {"keyId": b64(log_id(key.public_key()))},
        }

    def trusted_root(self, **tweaks):
        unknown = set(tweaks) - set(ROOT_TWEAKS)
        if unknown:
            raise SigstoreRefError(f"unknown trusted-root tweaks {sorted(unknown)}; known: {ROOT_TWEAKS}")
        ca = {
            "subject": {"organization": ORG, "commonName": "sigstore-ref"},
            "uri": FULCIO_URI,
            "certChain": {"certificates": [{"rawBytes": b64(der(self.fulcio.intermediate))},
                                           {"rawBytes": b64(der(self.fulcio.root))}]},
            "validFor": self._valid_for(*tweaks.get("ca_valid_for", (self.fulcio.valid_from,))),
        }
        tsa = {
            "subject": {"organization": ORG, "commonName": "sigstore-ref-tsa"},
            "uri": TSA_URI,
            "certChain": {"certificates": [{"rawBytes": b64(der(self.tsa.leaf))},
                                           {"rawBytes": b64(der(self.tsa.root))}]},
            "validFor": self._valid_for(*tweaks.get("tsa_valid_for", (self.tsa.valid_from,))),
        }
        return {
            "mediaType": TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [self._log_instance(REKOR_URL, self.rekor_key,
                                         tweaks.get("tlog_valid_for", (self.log_valid_from,)))],
            "certificateAuthorities": [] if tweaks.get("no_ca") else [ca],
            "ctlogs": [self._log_instance(CTLOG_URL, self.ct_key,
                                          tweaks.get("ctlog_valid_for", (self.log_valid_from,)))],
            "timestampAuthorities": [] if tweaks.get("no_tsa") else [tsa],
        }

    def write_trusted_root(self, path, **tweaks):
        root = self.trusted_root(**tweaks)
        write_json(root, path)
        return root

    # ---- Fulcio

    def _leaf(self, ca, identity, issuer, not_before, not_after, sct, eku, issuer_ext, key=None):
        """(leaf cert, leaf key, precert TBS bytes, SCT dicts) issued by `ca` with an embedded SCT."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key()
        serial = x509.random_serial_number()
        if "://" in identity:
            san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)])
        else:
            san = x509.SubjectAlternativeName([x509.RFC822Name(identity)])
        ski = ca.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

        def builder():
            b = (x509.CertificateBuilder()
                 .subject_name(x509.Name([]))
                 .issuer_name(ca.intermediate.subject)
                 .public_key(pub)
                 .serial_number(serial)
                 .not_valid_before(not_before)
                 .not_valid_after(not_after)
                 .add_extension(_ku(digital_signature=True), critical=True))
            if eku != "none":
                oid = ExtendedKeyUsageOID.CODE_SIGNING if eku == "codeSigning" else ExtendedKeyUsageOID.SERVER_AUTH
                b = b.add_extension(x509.ExtendedKeyUsage([oid]), critical=False)
            b = (b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                                critical=False)
                 .add_extension(san, critical=True))
            if issuer_ext in ("both", "legacy"):
                b = b.add_extension(x509.UnrecognizedExtension(OID_ISSUER_LEGACY, issuer.encode("ascii")),
                                    critical=False)
            if issuer_ext in ("both", "v2"):
                b = b.add_extension(x509.UnrecognizedExtension(OID_ISSUER_V2, der_utf8_string(issuer)),
                                    critical=False)
            return b

        precert = builder().sign(ca.intermediate_key, hashes.SHA384())
        tbs = precert.tbs_certificate_bytes
        if sct == "none":
            return precert, key, tbs, []
        ct_key = self.other_ct_key if sct == "other_log" else self.ct_key
        ts_ms = _unix(not_before) * 1000 + 250
        issuer_key_hash = hashlib.sha256(spki_der(ca.intermediate.public_key())).digest()
        signed = sct_signed_data(ts_ms, issuer_key_hash, tbs)
        if sct == "forged":   # the right key, over a TBS with one byte changed: looks fine, does not verify
            signed = sct_signed_data(ts_ms, issuer_key_hash, tbs[:-1] + bytes([tbs[-1] ^ 1]))
        sig = ecdsa_sign(ct_key, signed)
        raw = sct_struct(log_id(ct_key.public_key()), ts_ms, sig)
        ext = x509.UnrecognizedExtension(OID_SCT_LIST, der_octet_string(sct_list([raw])))
        leaf = builder().add_extension(ext, critical=False).sign(ca.intermediate_key, hashes.SHA384())
        return leaf, key, tbs, [{"log_id": log_id(ct_key.public_key()), "timestamp": ts_ms, "signature": sig}]

    # ---- Rekor

    @staticmethod
    def _envelope_hash(env):
        return hashlib.sha256(json.dumps(env, separators=(",", ":")).encode("utf-8")).hexdigest()

    @staticmethod
    def _body(kind, env, sig, payload, leaf):
        """The canonicalized Rekor body of kind dsse v0.0.1 or intoto v0.0.2."""
        payload_hash = {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()}
        env_hash = {"algorithm": "sha256", "value": Instance._envelope_hash(env)}
        if kind == "dsse":
            obj = {"apiVersion": "0.0.1", "kind": "dsse", "spec": {
                "envelopeHash": env_hash,
                "payloadHash": payload_hash,
                "signatures": [{"signature": b64(sig), "verifier": b64(pem(leaf))}],
            }}
        else:
            obj = {"apiVersion": "0.0.2", "kind": "intoto", "spec": {"content": {
                "envelope": {"payloadType": env["payloadType"],
                             "signatures": [{"sig": b64(b64(sig).encode("ascii")),
                                             "publicKey": b64(pem(leaf))}]},
                "hash": env_hash,
                "payloadHash": payload_hash,
            }}}
        return canonical_json(obj)

    def checkpoint(self, size, root_hash, key=None, extra=None):
        """A signed note for the tree head; `key` defaults to the log key."""
        key = key or self.rekor_key
        note = f"{self.origin}\n{size}\n{b64(root_hash)}\n"
        for line in extra or ():
            note += line + "\n"
        sig = ecdsa_sign(key, note.encode("utf-8"))
        hint = log_id(key.public_key())[:4]
        return note + "\n" + f"\u2014 {REKOR_HOST} {b64(hint + sig)}\n"

    def set_payload(self, body, integrated_time, log_index):
        return canonical_json({"body": b64(body), "integratedTime": int(integrated_time),
                               "logID": log_id(self.rekor_key.public_key()).hex(),
                               "logIndex": int(log_index)})

    # ---- signing

    def sign(self, payload, identity=DEFAULT_IDENTITY, issuer=DEFAULT_ISSUER, **opts):
        """A keyless DSSE bundle (JSON dict) over `payload` bytes; see the module docstring for opts."""
        unknown = set(opts) - set(DEFAULT_SIGN)
        if unknown:
            raise SigstoreRefError(f"unknown sign options {sorted(unknown)}")
        o = dict(DEFAULT_SIGN, **opts)
        for k, choices in SIGN_CHOICES.items():
            if o[k] not in choices:
                raise SigstoreRefError(f"sign option {k}={o[k]!r}; choices: {choices}")
        if not 0 <= o["tree_index"] < o["tree_size"]:
            raise SigstoreRefError("tree_index must lie in [0, tree_size)")

        t = _naive_utc(o["at"]) if o["at"] is not None else self.now()
        if o["leaf_validity"] is not None:
            not_before, not_after = (self._at(d, t) for d in o["leaf_validity"])
        else:
            not_before = t - LEAF_BACKDATE
            not_after = not_before + LEAF_LIFETIME
            if o["tsa"] != "none":
                real = utcnow()
                if not not_before <= real <= not_after:
                    raise SigstoreRefError(
                        "tsa needs the signing time near the real clock: openssl ts stamps with the real "
                        f"time ({rfc3339(real)}), outside the leaf's validity {rfc3339(not_before)}.."
                        f"{rfc3339(not_after)}; use Instance(now=None) or pass leaf_validity")
        ca = self.fulcio if o["ca"] == "trusted" else self.untrusted_fulcio
        leaf, leaf_key, tbs, scts = self._leaf(ca, identity, issuer, not_before, not_after, o["sct"],
                                               o["eku"], o["issuer_ext"])

        # DSSE envelope
        sig = ecdsa_sign(leaf_key, oms_ref.pae(PAYLOAD_TYPE, payload))
        sigs = [{"sig": b64(sig), "keyid": ""}]
        if o["two_signatures"]:
            sigs.append({"sig": b64(ecdsa_sign(ec.generate_private_key(ec.SECP256R1()),
                                               oms_ref.pae(PAYLOAD_TYPE, payload))), "keyid": ""})
        env = {"payload": b64(payload), "payloadType": PAYLOAD_TYPE, "signatures": sigs}

        vm = {}
        if o["version"] == "0.3":
            vm["certificate"] = {"rawBytes": b64(der(leaf))}
        else:
            chain = [leaf] + ([ca.intermediate] if o["include_intermediate"] else [])
            vm["x509CertificateChain"] = {"certificates": [{"rawBytes": b64(der(c))} for c in chain]}

        # transparency log entry
        entries = []
        details = {"leaf": leaf, "leaf_key": leaf_key, "precert_tbs": tbs, "scts": scts,
                   "issuing_ca": ca.intermediate, "signature": sig, "envelope": env, "options": o}
        if o["tlog_entries"]:
            body_sig, body_payload, body_leaf = sig, payload, leaf
            if o["body"] == "other_signature":   # a valid signature over the same PAE, but not this one
                body_sig = ecdsa_sign(leaf_key, oms_ref.pae(PAYLOAD_TYPE, payload))
            elif o["body"] == "other_payload":
                body_payload = payload + b"\n"
            elif o["body"] == "other_verifier":  # same identity and CA, another key and certificate
                body_leaf = self._leaf(ca, identity, issuer, not_before, not_after, "good", o["eku"],
                                       o["issuer_ext"])[0]
            body_env = dict(env, signatures=[{"sig": b64(body_sig), "keyid": ""}])
            body = self._body(o["kind"], body_env, body_sig, body_payload, body_leaf)

            size, index = o["tree_size"], o["tree_index"]
            leaves = [leaf_hash(secrets.token_bytes(48)) for _ in range(size)]
            leaves[index] = leaf_hash(body)
            if o["proof"] == "other_leaf":        # a consistent proof for another leaf at the same index
                leaves[index] = leaf_hash(secrets.token_bytes(48))
            root_hash = merkle_root(leaves)
            path = merkle_path(index, leaves)

            log_index = index + o["log_index_offset"]
            it = o["integrated_time"]
            if it is None:
                it = _unix(t)
            elif isinstance(it, (datetime.datetime, datetime.timedelta)):
                it = _unix(self._at(it, t))
            set_data = self.set_payload(body, it, log_index)
            if o["set"] == "forged":              # the right key over another entry's payload
                set_data = self.set_payload(body, it, log_index + 1)
            set_sig = ecdsa_sign(self.rekor_key, set_data)
            it += o["integrated_time_delta"]

            entry = {
                "logIndex": str(log_index),
                "logId": {"keyId": b64(log_id(self.rekor_key.public_key()))},
                "kindVersion": {"kind": o["kind"], "version": "0.0.1" if o["kind"] == "dsse" else "0.0.2"},
                "integratedTime": str(it),
            }
            if o["set"] != "none":
                entry["inclusionPromise"] = {"signedEntryTimestamp": b64(set_sig)}
            if o["proof"] != "none":
                proof = {"logIndex": str(index), "rootHash": b64(root_hash), "treeSize": str(size),
                         "hashes": [b64(h) for h in path]}
                if o["checkpoint"] != "none":
                    cp_key = self.other_rekor_key if o["checkpoint"] == "other_key" else self.rekor_key
                    cp_root = secrets.token_bytes(32) if o["checkpoint"] == "other_root" else root_hash
                    proof["checkpoint"] = {"envelope": self.checkpoint(size, cp_root, cp_key,
                                                                       o["checkpoint_extra"])}
                entry["inclusionProof"] = proof
            entry["canonicalizedBody"] = b64(body)
            entries.append(entry)
            details.update(body=body, tree_leaves=leaves, root_hash=root_hash, path=path,
                           integrated_time=it, log_index=log_index, set_payload=set_data, set=set_sig)
        vm["tlogEntries"] = entries

        # RFC 3161 timestamp over the signature bytes
        if o["tsa"] != "none":
            tsa = self.tsa if o["tsa"] == "good" else self.untrusted_tsa
            resp = tsa.timestamp(sig)
            vm["timestampVerificationData"] = {"rfc3161Timestamps": [{"signedTimestamp": b64(resp)}]}
            details["tsa_response"] = resp

        self.last = details
        return {"mediaType": BUNDLE_MEDIA_TYPES[o["version"]], "verificationMaterial": vm,
                "dsseEnvelope": env}


# --------------------------------------------------------------------------------------------------
# catalogues of variants

IDENTITIES = {
    "email": (DEFAULT_IDENTITY, DEFAULT_ISSUER),
    "uri": (WORKLOAD_IDENTITY, WORKLOAD_ISSUER),
}


def _good():
    out = {}
    for version in ("0.1", "0.2", "0.3"):
        for kind in ("dsse", "intoto"):
            for who, (identity, issuer) in IDENTITIES.items():
                for tsa in ("none", "good"):
                    name = f"v{version}-{kind}-{who}-{'tsa' if tsa == 'good' else 'notsa'}"
                    out[name] = dict(sign=dict(version=version, kind=kind, tsa=tsa), identity=identity,
                                     issuer=issuer, root={}, note="matrix")
    extras = {
        "issuer_ext_legacy": (dict(issuer_ext="legacy"), "only the legacy 1.1 issuer extension (raw ASCII)"),
        "issuer_ext_v2": (dict(issuer_ext="v2"), "only the 1.8 issuer extension (DER UTF8String)"),
        "v0.1_set_only": (dict(version="0.1", proof="none"), "v0.1 entry with an inclusionPromise, no proof"),
        "v0.2_with_intermediate": (dict(version="0.2", include_intermediate=True),
                                   "x509CertificateChain = leaf + intermediate"),
        "v0.1_with_intermediate": (dict(version="0.1", include_intermediate=True, kind="intoto"),
                                   "x509CertificateChain = leaf + intermediate"),
        "sharded_log_index": (dict(log_index_offset=123456789),
                              "entry logIndex global, proof logIndex in the shard (SET over the global one)"),
        "checkpoint_timestamp_line": (dict(checkpoint_extra=["Timestamp: 1700000000123456789"]),
                                      "checkpoint note with an extra line after the root hash"),
        "tree_size_1": (dict(tree_size=1, tree_index=0), "single-leaf tree: empty audit path"),
        "tree_size_2_last": (dict(tree_size=2, tree_index=1), "two leaves, ours last"),
        "tree_size_8": (dict(tree_size=8, tree_index=5), "perfect tree"),
        "tree_index_0": (dict(tree_size=13, tree_index=0), "first leaf of an unbalanced tree"),
        "tree_index_last": (dict(tree_size=13, tree_index=12), "last leaf: the lone right edge"),
        "tree_size_1000": (dict(tree_size=1000, tree_index=777), "a bigger unbalanced tree"),
        "proof_only_with_tsa": (dict(set="none", tsa="good"),
                                "inclusion proven by the proof, time by the TSA (no SET)"),
        "intoto_sharded_tsa": (dict(kind="intoto", log_index_offset=42, tsa="good", version="0.2"),
                               "intoto + sharded index + TSA"),
    }
    for name, (sign, note) in extras.items():
        out[name] = dict(sign=sign, identity=DEFAULT_IDENTITY, issuer=DEFAULT_ISSUER, root={}, note=note)
    return out


GOOD = _good()


def _hostile():
    day = datetime.timedelta(days=1)
    minute = datetime.timedelta(minutes=1)
    return {
        "wrong_ca": dict(sign=dict(ca="untrusted"), root={},
                         note="leaf issued by a CA (same names, other keys) that is not in the trusted root"),
        "ca_outside_validfor": dict(sign={}, root=dict(ca_valid_for=(-30 * day, -day)),
                                    note="the trusted root's CA validFor window ends before the signing time"),
        "expired_at_integrated_time": dict(
            sign=dict(integrated_time=30 * minute), root={},
            note="integratedTime (consistently signed in the SET) is after the leaf expired"),
        "missing_sct": dict(sign=dict(sct="none"), root={}, note="the leaf carries no embedded SCT"),
        "forged_sct": dict(sign=dict(sct="forged"), root={},
                           note="the SCT names the trusted CT log but its signature does not verify"),
        "sct_unknown_log": dict(sign=dict(sct="other_log"), root={},
                                note="the SCT is signed by a CT log that is not in the trusted root"),
        "forged_set": dict(sign=dict(set="forged"), root={},
                           note="the SET (inclusionPromise) does not verify over this entry"),
        "altered_integrated_time": dict(sign=dict(integrated_time_delta=60), root={},
                                        note="integratedTime changed after the SET was signed"),
        "proof_other_leaf": dict(sign=dict(proof="other_leaf"), root={},
                                 note="the inclusion proof (and its checkpoint) is for a different leaf"),
        "checkpoint_other_key": dict(sign=dict(checkpoint="other_key"), root={},
                                     note="the checkpoint is signed by a key that is not a trusted tlog"),
        "checkpoint_other_root": dict(sign=dict(checkpoint="other_root"), root={},
                                      note="the checkpoint is validly signed but for another root hash"),
        "body_other_signature": dict(sign=dict(body="other_signature"), root={},
                                     note="the logged body records a different signature than the bundle's"),
        "body_other_payload": dict(sign=dict(body="other_payload"), root={},
                                   note="the logged body records a different payload hash"),
        "body_other_verifier": dict(sign=dict(body="other_verifier"), root={},
                                    note="the logged body names another certificate (same identity, other key)"),
        "two_signatures": dict(sign=dict(two_signatures=True), root={},
                               note="the DSSE envelope holds two signatures"),
        "no_ca_in_root": dict(sign={}, root=dict(no_ca=True),
                              note="the trusted root lists no certificate authority"),
        "no_code_signing_eku": dict(sign=dict(eku="serverAuth"), root={},
                                    note="the leaf's extendedKeyUsage is serverAuth, not codeSigning"),
        "tsa_untrusted": dict(sign=dict(tsa="untrusted", set="none"), root={},
                              note="the only signed time is a timestamp from a TSA not in the trusted root "
                                   "(the entry has an inclusion proof but no SET)"),
        "tsa_after_leaf_expiry": dict(
            sign=dict(tsa="good", leaf_validity=(-40 * minute, -30 * minute), integrated_time=-35 * minute),
            root={},
            note="the trusted TSA's time (the real clock) is after the leaf expired"),
        "no_time_evidence": dict(sign=dict(set="none", tsa="none"), root={},
                                 note="inclusion is proven (proof + checkpoint) but there is no SET and no "
                                      "TSA timestamp: integratedTime is unsigned, so no trusted time"),
        "no_tlog_entry": dict(sign=dict(tlog_entries=0, tsa="good"), root={},
                              note="no transparency log entry at all (only a TSA timestamp)"),
    }


HOSTILE = _hostile()

# Hostile cases sigstore-js (@sigstore/verify 2.1.1) accepts, and why. Everything else it rejects.
SIGSTORE_JS_CANNOT_JUDGE = {
    "no_code_signing_eku": "sigstore-js never looks at keyUsage / extendedKeyUsage of the leaf",
    "no_time_evidence": "sigstore-js takes integratedTime of an entry with only an inclusion proof as a "
                        "verified timestamp, although nothing signs it",
    "body_other_verifier": "sigstore-js compares only the signature and payload hash of the body, not its "
                           "verifier/publicKey certificate",
}
