#!/usr/bin/python3
"""oms_ref: an independent, test-only reference implementation of OpenSSF Model Signing (OMS) v1.0.

Written from /work/shared/specs/oms.md, NOT from drun's code, so that drun's bundles can be checked by
a second implementation and drun's verifier can be fed bundles shaped like those of other producers
(the `model_signing` reference implementation and the spec).

Only for tests: it favours clarity over speed and has no hardening beyond what the tests need.

Library use (see the functions below):
    key = generate_key("p256")
    bundle = sign_model(model_dir, key, out_path, method="shards", shard_size=65536,
                        variant={"shardalg": "spec", "payload": "compact"})
    verify_model(model_dir, out_path, public_key_pem=pem_bytes)   # raises OmsError on failure

CLI:
    oms_ref.py keygen --curve p256 --out KEY.pem              (writes KEY.pem (0600) and KEY.pem.pub)
    oms_ref.py sign MODEL --key KEY.pem [--out SIG] [--method files|shards] [--hash sha256|blake2b|blake3]
                    [--shard-size N] [--ignore REL]... [--variant NAME=VALUE]...
                    [--cert LEAF.pem [--chain CHAIN.pem]]
    oms_ref.py verify MODEL --sig SIG (--public-key PUB.pem | --ca-bundle ROOTS.pem)
                    [--ignore REL]... [--ignore-unsigned-files]
    oms_ref.py extract SIG --pae OUT.bin --sig-der OUT.der   (for checking with the openssl CLI)

Variants (--variant NAME=VALUE, defaults first):
    key       = hint | rawbytes | cert     verificationMaterial style (cert needs --cert)
    single    = dot | basename             name of the only resource of a single-file model
    shardalg  = reference | spec           "sha256-sharded-<N>" or plain "sha256"
    shardsize = int | float                shard_size written as N or N.0
    payload   = indent | compact           payload JSON layout
    keyid     = absent | empty | null      signatures[0].keyid
    order     = component | codepoint      resource order (reference: path components, shards by
                                           start; spec: Unicode code points of the name)
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
DEFAULT_IGNORES = (".git", ".gitattributes", ".github", ".gitignore")
DEFAULT_SHARD_SIZE = 1_000_000_000
DEFAULT_SIG_NAME = "model.sig"
HASH_TYPES = ("sha256", "blake2b", "blake3")

DEFAULT_VARIANT = {
    "key": "hint",
    "single": "dot",
    "shardalg": "reference",
    "shardsize": "int",
    "payload": "indent",
    "keyid": "absent",
    "order": "component",
}
VARIANT_CHOICES = {
    "key": ("hint", "rawbytes", "cert"),
    "single": ("dot", "basename"),
    "shardalg": ("reference", "spec"),
    "shardsize": ("int", "float"),
    "payload": ("indent", "compact"),
    "keyid": ("absent", "empty", "null"),
    "order": ("component", "codepoint"),
}

CURVES = {
    "p256": ec.SECP256R1,
    "p384": ec.SECP384R1,
    "p521": ec.SECP521R1,
}
KEY_DETAILS = {
    "secp256r1": "PKIX_ECDSA_P256_SHA_256",
    "secp384r1": "PKIX_ECDSA_P384_SHA_384",
    "secp521r1": "PKIX_ECDSA_P521_SHA_512",
}


class OmsError(Exception):
    """Any failure to build or verify a bundle; the message says what and where."""


# --------------------------------------------------------------------------------------------------
# keys and hashes


def generate_key(curve="p256"):
    if curve == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if curve not in CURVES:
        raise OmsError(f"unknown curve {curve!r}")
    return ec.generate_private_key(CURVES[curve]())


def ecdsa_hash_for_curve(curve):
    """P-256 -> SHA-256, P-384 -> SHA-384, P-521 -> SHA-512; nothing else."""
    algs = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}
    if curve.name not in algs:
        raise OmsError(f"unsupported ECDSA curve {curve.name}")
    return algs[curve.name]()


def private_key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def canonical_public_pem(public_key):
    """`-----BEGIN PUBLIC KEY-----\\n`, base64 SPKI in 64-column lines, `-----END PUBLIC KEY-----\\n`."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n").encode(
        "ascii"
    )


def key_hint(public_key):
    return hashlib.sha256(canonical_public_pem(public_key)).hexdigest()


def _strip_pem_preamble(data):
    """PEM files may carry text before the BEGIN line: skip it."""
    idx = data.find(b"-----BEGIN ")
    if idx < 0:
        raise OmsError("no PEM BEGIN line found")
    return data[idx:]


def load_public_key_pem(data):
    return serialization.load_pem_public_key(_strip_pem_preamble(data))


def load_private_key_pem(data):
    return serialization.load_pem_private_key(_strip_pem_preamble(data), password=None)


def write_private_key(path, key):
    data = private_key_pem(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public_key(path, public_key):
    with open(path, "wb") as f:
        f.write(canonical_public_pem(public_key))


class _B3sum:
    """BLAKE3 through Debian's b3sum (the BLAKE3 team's Rust implementation), fed as a stream:
    Python's hashlib has no BLAKE3, and b3sum is independent of the C code drun builds."""

    def __init__(self):
        exe = shutil.which("b3sum")
        if not exe:
            raise OmsError("blake3 needs b3sum (Debian's b3sum package; scripts/bootstrap.sh installs it)")
        self.proc = subprocess.Popen([exe, "--no-names"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def update(self, data):
        self.proc.stdin.write(data)

    def hexdigest(self):
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            raise OmsError("b3sum failed")
        return out.decode().strip()


def new_hasher(hash_type):
    if hash_type == "sha256":
        return hashlib.sha256()
    if hash_type == "blake2b":
        return hashlib.blake2b(digest_size=64)
    if hash_type == "blake3":
        return _B3sum()
    raise OmsError(f"unsupported hash_type {hash_type!r}")


def digest_range(path, hash_type, start=0, end=None):
    h = new_hasher(hash_type)
    with open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            chunk = f.read(n)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    if remaining not in (None, 0):
        raise OmsError(f"{path}: file shorter than expected")
    return h.hexdigest()


def root_digest(resources):
    """SHA-256 over the concatenated raw (hex-decoded) resource digests, in listed order."""
    h = hashlib.sha256()
    for r in resources:
        h.update(bytes.fromhex(r["digest"]))
    return h.hexdigest()


def pae(payload_type, payload):
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_bytes(private_key, data):
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    return private_key.sign(data, ec.ECDSA(ecdsa_hash_for_curve(private_key.curve)))


def verify_bytes(public_key, sig, data):
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(sig, data, ec.ECDSA(ecdsa_hash_for_curve(public_key.curve)))
        else:
            raise OmsError("unsupported public key type")
    except InvalidSignature:
        raise OmsError("signature verification failed") from None


# --------------------------------------------------------------------------------------------------
# model enumeration and resources


def _is_ignored(rel, ignore_paths):
    for ig in ignore_paths:
        ig = ig.strip("/")
        if rel == ig or rel.startswith(ig + "/"):
            return True
    return False


def enumerate_files(model, ignore_paths=()):
    """Relative POSIX paths of the regular files under directory `model`, sorted component-wise.

    Symlinks, sockets, pipes and devices are errors unless under an ignored path."""
    out = []

    def walk(abs_dir, rel_dir):
        with os.scandir(abs_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = e.name if not rel_dir else rel_dir + "/" + e.name
            if _is_ignored(rel, ignore_paths):
                continue
            st = os.lstat(e.path)
            if stat.S_ISLNK(st.st_mode):
                raise OmsError(f"{rel}: is a symlink (allow_symlinks is false)")
            if stat.S_ISDIR(st.st_mode):
                walk(e.path, rel)
            elif stat.S_ISREG(st.st_mode):
                out.append(rel)
            else:
                raise OmsError(f"{rel}: not a regular file")

    walk(model, "")
    out.sort(key=lambda p: PurePosixPath(p).parts)
    return out


def _sig_relpath(model, sig_path):
    """The signature's path relative to a directory model, or None when it lies outside."""
    if sig_path is None or not os.path.isdir(model):
        return None
    m = os.path.realpath(model)
    s = os.path.realpath(sig_path)
    if s.startswith(m + os.sep):
        return PurePosixPath(os.path.relpath(s, m)).as_posix()
    return None


def shard_ranges(size, shard_size):
    return [(s, min(s + shard_size, size)) for s in range(0, size, shard_size)]


def parse_shard_name(name):
    """`<path>:<start>:<end>`, integers parsed from the right (paths may contain ':')."""
    try:
        rest, end = name.rsplit(":", 1)
        path, start = rest.rsplit(":", 1)
        return path, int(start), int(end)
    except ValueError:
        raise OmsError(f"malformed shard resource name {name!r}") from None


def _sort_resources(resources, method, order):
    if order == "codepoint":
        resources.sort(key=lambda r: r["name"])
    elif method == "shards":
        def key(r):
            p, s, _ = parse_shard_name(r["name"])
            return (PurePosixPath(p).parts, s)
        resources.sort(key=key)
    else:
        resources.sort(key=lambda r: PurePosixPath(r["name"]).parts)
    return resources


def compute_resources(model, method="files", hash_type="sha256", shard_size=DEFAULT_SHARD_SIZE,
                      ignore_paths=(), single="dot", shardalg="reference", order="component"):
    """The resource list of `model` (a directory or a single file)."""
    if method not in ("files", "shards"):
        raise OmsError(f"unknown method {method!r}")
    new_hasher(hash_type)  # validates
    if os.path.isdir(model):
        files = [(rel, os.path.join(model, *rel.split("/"))) for rel in enumerate_files(model, ignore_paths)]
    elif os.path.isfile(model) and not os.path.islink(model):
        name = "." if single == "dot" else os.path.basename(model)
        files = [(name, model)]
    else:
        raise OmsError(f"{model}: not a regular file or directory")
    resources = []
    for name, path in files:
        if method == "files":
            resources.append({"algorithm": hash_type, "digest": digest_range(path, hash_type), "name": name})
        else:
            alg = f"{hash_type}-sharded-{shard_size}" if shardalg == "reference" else hash_type
            for s, e in shard_ranges(os.path.getsize(path), shard_size):
                resources.append({"algorithm": alg, "digest": digest_range(path, hash_type, s, e),
                                  "name": f"{name}:{s}:{e}"})
    return _sort_resources(resources, method, order)


def build_statement(model, method="files", hash_type="sha256", shard_size=DEFAULT_SHARD_SIZE,
                    ignore_paths=(), recorded_ignores=None, variant=None):
    v = dict(DEFAULT_VARIANT, **(variant or {}))
    resources = compute_resources(model, method, hash_type, shard_size, ignore_paths,
                                  single=v["single"], shardalg=v["shardalg"], order=v["order"])
    return statement_from_resources(
        os.path.basename(os.path.normpath(os.path.abspath(model))), resources, method, hash_type,
        shard_size, list(ignore_paths) if recorded_ignores is None else recorded_ignores, v)


def statement_from_resources(subject_name, resources, method, hash_type, shard_size=DEFAULT_SHARD_SIZE,
                             ignore_paths=(), variant=None):
    v = dict(DEFAULT_VARIANT, **(variant or {}))
    ser = {"method": method, "hash_type": hash_type, "allow_symlinks": False}
    if method == "shards":
        ser["shard_size"] = float(shard_size) if v["shardsize"] == "float" else int(shard_size)
    ser["ignore_paths"] = list(ignore_paths)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"serialization": ser, "resources": resources},
    }


def serialize_payload(statement, style="indent"):
    if style == "compact":
        return json.dumps(statement, separators=(",", ":")).encode("utf-8")
    return json.dumps(statement, indent=2).encode("utf-8")


# --------------------------------------------------------------------------------------------------
# bundles


def verification_material(style, signing_key=None, cert_chain=None):
    if style == "hint":
        return {"publicKey": {"hint": key_hint(signing_key.public_key())}, "tlogEntries": []}
    if style == "rawbytes":
        pub = signing_key.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise OmsError("rawbytes key style needs an ECDSA key")
        return {
            "publicKey": {
                "rawBytes": base64.b64encode(canonical_public_pem(pub)).decode("ascii"),
                "keyDetails": KEY_DETAILS[pub.curve.name],
            },
            "tlogEntries": [],
        }
    if style == "cert":
        if not cert_chain:
            raise OmsError("certificate style needs a certificate chain")
        return {
            "x509CertificateChain": {
                "certificates": [
                    {"rawBytes": base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")}
                    for c in cert_chain
                ]
            },
            "tlogEntries": [],
        }
    raise OmsError(f"unknown key style {style!r}")


def sign_payload(payload, private_key, vm, keyid="absent"):
    """A bundle dict over the exact payload bytes; `vm` is the verificationMaterial object."""
    sig = sign_bytes(private_key, pae(PAYLOAD_TYPE, payload))
    entry = {"sig": base64.b64encode(sig).decode("ascii")}
    if keyid == "empty":
        entry["keyid"] = ""
    elif keyid == "null":
        entry["keyid"] = None
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": vm,
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [entry],
        },
    }


def sign_statement(statement, private_key, variant=None, cert_chain=None):
    """Sign an arbitrary (possibly hostile) statement dict: the tests use it to craft bundles."""
    v = dict(DEFAULT_VARIANT, **(variant or {}))
    if cert_chain and v["key"] == "hint":
        v["key"] = "cert"
    payload = serialize_payload(statement, v["payload"])
    vm = verification_material(v["key"], private_key, cert_chain)
    return sign_payload(payload, private_key, vm, v["keyid"])


def write_bundle(bundle, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(bundle, f, indent=2)
        f.write("\n")


def default_sig_path(model):
    model = os.path.normpath(model)
    if os.path.isdir(model):
        return os.path.join(model, DEFAULT_SIG_NAME)
    return model + ".sig"


def sign_model(model, private_key, out_path=None, method="files", hash_type="sha256",
               shard_size=DEFAULT_SHARD_SIZE, ignore_paths=(), variant=None, cert_chain=None):
    """Sign `model` like model_signing would; writes the bundle to out_path (if given) and returns it."""
    out_path = out_path or default_sig_path(model)
    ignores = list(DEFAULT_IGNORES) if os.path.isdir(model) else []
    sig_rel = _sig_relpath(model, out_path)
    if sig_rel is not None:
        ignores.append(sig_rel)
    ignores += [p for p in ignore_paths if p not in ignores]
    statement = build_statement(model, method, hash_type, shard_size, ignores, ignores, variant)
    bundle = sign_statement(statement, private_key, variant, cert_chain)
    write_bundle(bundle, out_path)
    return bundle


# --------------------------------------------------------------------------------------------------
# PKI helpers (test CA, intermediate, leaf)


def _utcnow():
    return datetime.datetime.utcnow().replace(microsecond=0)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drun tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


_KU_FIELDS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


def _key_usage(names):
    names = set(names)
    unknown = names - set(_KU_FIELDS)
    if unknown:
        raise OmsError(f"unknown key usages {unknown}")
    return x509.KeyUsage(**{f: (f in names) for f in _KU_FIELDS})


_EKU = {"code_signing": ExtendedKeyUsageOID.CODE_SIGNING, "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
        "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH, "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION}


def make_cert(subject_cn, key, issuer=None, ca=False, key_usage=None, eku=None,
              not_before=None, not_after=None, path_length=None):
    """A certificate for `key`; issuer is (issuer_cert, issuer_key) or None for self-signed.

    key_usage / eku: iterables of names (see _KU_FIELDS, _EKU), or None to omit the extension."""
    now = _utcnow()
    not_before = not_before or now - datetime.timedelta(days=1)
    not_after = not_after or now + datetime.timedelta(days=30)
    pub = key.public_key()
    if issuer is None:
        issuer_name, signer, issuer_pub = _name(subject_cn), key, pub
    else:
        issuer_name, signer, issuer_pub = issuer[0].subject, issuer[1], issuer[1].public_key()
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject_cn))
         .issuer_name(issuer_name)
         .public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub), critical=False))
    if key_usage is not None:
        b = b.add_extension(_key_usage(key_usage), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([_EKU[n] for n in eku]), critical=False)
    sign_hash = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(signer, sign_hash)


def make_root_ca(cn="drun test root", curve="p256", key=None, **kw):
    key = key or generate_key(curve)
    cert = make_cert(cn, key, None, ca=True, key_usage=("key_cert_sign", "crl_sign", "digital_signature"),
                     path_length=None, **kw)
    return cert, key


def make_intermediate_ca(issuer, cn="drun test intermediate", curve="p256", **kw):
    key = generate_key(curve)
    cert = make_cert(cn, key, issuer, ca=True, key_usage=("key_cert_sign", "crl_sign", "digital_signature"),
                     path_length=0, **kw)
    return cert, key


def make_leaf(issuer, cn="drun test signer", curve="p256", key_usage=("digital_signature",),
              eku=("code_signing",), not_before=None, not_after=None):
    key = generate_key(curve)
    cert = make_cert(cn, key, issuer, ca=False, key_usage=key_usage, eku=eku,
                     not_before=not_before, not_after=not_after)
    return cert, key


def cert_pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_certs(path, *certs):
    with open(path, "wb") as f:
        f.write(cert_pem(*certs))


def load_certs_pem(data):
    out = []
    marker = b"-----BEGIN CERTIFICATE-----"
    end = b"-----END CERTIFICATE-----"
    pos = 0
    while True:
        i = data.find(marker, pos)
        if i < 0:
            break
        j = data.find(end, i)
        if j < 0:
            raise OmsError("unterminated certificate PEM")
        out.append(x509.load_pem_x509_certificate(data[i : j + len(end)] + b"\n"))
        pos = j + len(end)
    return out


def _cert_signed_by(cert, issuer):
    pub = issuer.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _check_validity(cert, at, what):
    if at < cert.not_valid_before or at > cert.not_valid_after:
        raise OmsError(f"{what} certificate is not valid at {at.isoformat()}Z "
                       f"(valid {cert.not_valid_before.isoformat()}Z .. {cert.not_valid_after.isoformat()}Z)")


def _is_ca(cert):
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_leaf_usage(leaf):
    """The leaf must be a code signer: not a CA; a keyUsage, if present, includes digitalSignature;
    an extendedKeyUsage, if present, includes codeSigning (RFC 5280: present extensions restrict);
    at least one of the two is present."""
    if _is_ca(leaf):
        raise OmsError("the signing certificate is a CA certificate")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if ku is None and eku is None:
        raise OmsError("leaf certificate has neither keyUsage nor extendedKeyUsage")
    if ku is not None and not ku.digital_signature:
        raise OmsError("leaf certificate keyUsage lacks digitalSignature")
    if eku is not None and ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise OmsError("leaf certificate extendedKeyUsage lacks codeSigning")


def verify_cert_chain(chain, roots, at=None):
    """chain = [leaf, intermediates...]; roots = trusted certificates. Raises OmsError."""
    if not chain:
        raise OmsError("empty certificate chain")
    if not roots:
        raise OmsError("no trusted roots")
    at = at or _utcnow()
    check_leaf_usage(chain[0])
    for i, cert in enumerate(chain):
        what = "leaf" if i == 0 else f"chain[{i}]"
        _check_validity(cert, at, what)
        if i > 0 and not _is_ca(cert):
            raise OmsError(f"{what} certificate is not a CA")
        for r in roots:
            if r.subject == cert.issuer and _cert_signed_by(cert, r):
                _check_validity(r, at, "root")
                return r
        if i + 1 >= len(chain):
            raise OmsError("certificate chain does not lead to a trusted root")
        nxt = chain[i + 1]
        if nxt.subject != cert.issuer or not _cert_signed_by(cert, nxt):
            raise OmsError(f"{what} certificate is not signed by the next certificate in the chain")
    raise OmsError("certificate chain does not lead to a trusted root")


# --------------------------------------------------------------------------------------------------
# verification


def _b64decode(s, what):
    if not isinstance(s, str):
        raise OmsError(f"{what}: not a base64 string")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise OmsError(f"{what}: invalid base64 ({e})") from None


def is_safe_name(name):
    if not isinstance(name, str) or name == "" or name.startswith("/") or name.endswith("/") or "\\" in name:
        return False
    if "\x00" in name:
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


def parse_bundle(data):
    """-> (bundle dict, payload bytes, signature bytes). Checks the envelope's shape only."""
    try:
        bundle = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise OmsError(f"bundle is not valid JSON: {e}") from None
    if not isinstance(bundle, dict):
        raise OmsError("bundle JSON is not an object")
    if bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise OmsError(f"unexpected bundle mediaType {bundle.get('mediaType')!r}")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict):
        raise OmsError("bundle has no dsseEnvelope")
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise OmsError(f"unexpected payloadType {env.get('payloadType')!r}")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise OmsError("dsseEnvelope must hold exactly one signature")
    payload = _b64decode(env.get("payload"), "payload")
    sig = _b64decode(sigs[0].get("sig"), "signature")
    return bundle, payload, sig


def extract_pae_and_sig(sig_path):
    """(PAE bytes, raw signature bytes) of a bundle file: feed them to `openssl dgst -verify`."""
    with open(sig_path, "rb") as f:
        _, payload, sig = parse_bundle(f.read())
    return pae(PAYLOAD_TYPE, payload), sig


def check_statement(statement):
    """Shape checks on the statement; returns (serialization, resources)."""
    if not isinstance(statement, dict):
        raise OmsError("statement is not a JSON object")
    if statement.get("_type") != STATEMENT_TYPE:
        raise OmsError(f"unexpected statement _type {statement.get('_type')!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise OmsError(f"unexpected predicateType {statement.get('predicateType')!r}")
    subj = statement.get("subject")
    if not isinstance(subj, list) or len(subj) != 1:
        raise OmsError("statement must have exactly one subject")
    pred = statement.get("predicate") or {}
    ser = pred.get("serialization")
    res = pred.get("resources")
    if not isinstance(ser, dict) or not isinstance(res, list):
        raise OmsError("predicate lacks serialization or resources")
    if not res:
        raise OmsError("manifest lists no files (empty resources)")
    if ser.get("method") not in ("files", "shards"):
        raise OmsError(f"unsupported serialization method {ser.get('method')!r}")
    if ser.get("hash_type") not in HASH_TYPES:
        raise OmsError(f"unsupported hash_type {ser.get('hash_type')!r}")
    expected_root = root_digest(res)
    got_root = (subj[0].get("digest") or {}).get("sha256")
    if got_root != expected_root:
        raise OmsError(f"subject root digest {got_root} != sha256 over resource digests {expected_root}")
    return ser, res


def verify_model(model, sig_path, public_key_pem=None, ca_bundle_pem=None, ignore_paths=(),
                 ignore_unsigned=False, at=None):
    """Verify bundle `sig_path` for `model` (dir or single file). Returns the statement dict.

    Exactly one of public_key_pem / ca_bundle_pem (bytes) must be given. Raises OmsError."""
    if (public_key_pem is None) == (ca_bundle_pem is None):
        raise OmsError("give exactly one of a public key or a CA bundle")
    with open(sig_path, "rb") as f:
        bundle, payload, sig = parse_bundle(f.read())
    vm = bundle.get("verificationMaterial")
    if not isinstance(vm, dict):
        raise OmsError("bundle has no verificationMaterial")

    if public_key_pem is not None:
        pub = load_public_key_pem(public_key_pem)
        pk = vm.get("publicKey")
        if isinstance(pk, dict) and pk.get("hint"):
            if pk["hint"] != key_hint(pub):
                raise OmsError(f"publicKey.hint {pk['hint']} does not match the given key ({key_hint(pub)})")
    else:
        chain_obj = vm.get("x509CertificateChain")
        if not isinstance(chain_obj, dict) or not chain_obj.get("certificates"):
            raise OmsError("bundle carries no x509CertificateChain")
        chain = [x509.load_der_x509_certificate(_b64decode(c.get("rawBytes"), "certificate"))
                 for c in chain_obj["certificates"]]
        verify_cert_chain(chain, load_certs_pem(ca_bundle_pem), at)
        pub = chain[0].public_key()

    verify_bytes(pub, sig, pae(PAYLOAD_TYPE, payload))

    try:
        statement = json.loads(payload)
    except ValueError as e:
        raise OmsError(f"payload is not valid JSON: {e}") from None
    ser, res = check_statement(statement)
    method, hash_type = ser["method"], ser["hash_type"]
    shard_size = None
    if method == "shards":
        ss = ser.get("shard_size")
        if isinstance(ss, bool) or not isinstance(ss, (int, float)) or ss != int(ss) or ss <= 0:
            raise OmsError(f"invalid shard_size {ss!r}")
        shard_size = int(ss)

    # Expected name -> digest, checking names and algorithms.
    expected = {}
    for r in res:
        name, alg, dig = r.get("name"), r.get("algorithm"), r.get("digest")
        if not isinstance(name, str) or not isinstance(dig, str):
            raise OmsError(f"malformed resource {r!r}")
        path = parse_shard_name(name)[0] if method == "shards" else name
        if not (path == "." or is_safe_name(path)):
            raise OmsError(f"unsafe path in manifest: {path!r}")
        okalgs = {hash_type}
        if method == "shards":
            okalgs.add(f"{hash_type}-sharded-{shard_size}")
        if alg not in okalgs:
            raise OmsError(f"{name}: algorithm {alg!r} does not match hash_type {hash_type!r}")
        if name in expected:
            raise OmsError(f"{name}: listed twice")
        expected[name] = dig.lower()

    # Re-enumerate with the recorded policy.
    single = None
    ignores = []
    if os.path.isdir(model):
        ignores = list(DEFAULT_IGNORES) + [p for p in (ser.get("ignore_paths") or []) if isinstance(p, str)]
        rel = _sig_relpath(model, sig_path)
        if rel:
            ignores.append(rel)
        ignores += list(ignore_paths)
    elif os.path.isfile(model):
        paths = {(parse_shard_name(n)[0] if method == "shards" else n) for n in expected}
        single = "dot" if paths == {"."} else "basename"
    else:
        raise OmsError(f"{model}: no such file or directory")
    actual_list = compute_resources(model, method, hash_type, shard_size or DEFAULT_SHARD_SIZE,
                                    ignores, single=single or "dot")
    actual = {r["name"]: r["digest"] for r in actual_list}

    problems = []
    for name, dig in expected.items():
        if name not in actual:
            problems.append(f"{name}: missing")
        elif actual[name] != dig:
            problems.append(f"{name}: digest mismatch")
    if not ignore_unsigned:
        for name in actual:
            if name not in expected:
                problems.append(f"{name}: not in the manifest")
    if problems:
        raise OmsError("model does not match the manifest: " + "; ".join(problems))
    return statement


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_variants(items):
    v = {}
    for item in items or []:
        if "=" not in item:
            raise OmsError(f"--variant wants NAME=VALUE, got {item!r}")
        k, val = item.split("=", 1)
        if k not in VARIANT_CHOICES or val not in VARIANT_CHOICES[k]:
            raise OmsError(f"unknown variant {item!r}; choices: {VARIANT_CHOICES}")
        v[k] = val
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(prog="oms_ref.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    kg = sub.add_parser("keygen")
    kg.add_argument("--curve", default="p256", choices=sorted(CURVES) + ["ed25519"])
    kg.add_argument("--out", required=True)

    sg = sub.add_parser("sign")
    sg.add_argument("model")
    sg.add_argument("--key", required=True)
    sg.add_argument("--out")
    sg.add_argument("--method", default="files", choices=("files", "shards"))
    sg.add_argument("--hash", default="sha256", choices=HASH_TYPES)
    sg.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    sg.add_argument("--ignore", action="append", default=[])
    sg.add_argument("--variant", action="append", default=[])
    sg.add_argument("--cert")
    sg.add_argument("--chain")

    vf = sub.add_parser("verify")
    vf.add_argument("model")
    vf.add_argument("--sig", required=True)
    vf.add_argument("--public-key")
    vf.add_argument("--ca-bundle")
    vf.add_argument("--ignore", action="append", default=[])
    vf.add_argument("--ignore-unsigned-files", action="store_true")

    ex = sub.add_parser("extract")
    ex.add_argument("sig")
    ex.add_argument("--pae", required=True)
    ex.add_argument("--sig-der", required=True)

    args = ap.parse_args(argv)
    try:
        if args.cmd == "keygen":
            key = generate_key(args.curve)
            write_private_key(args.out, key)
            write_public_key(args.out + ".pub", key.public_key())
            print(f"wrote {args.out} and {args.out}.pub")
        elif args.cmd == "sign":
            with open(args.key, "rb") as f:
                key = load_private_key_pem(f.read())
            chain = None
            if args.cert:
                with open(args.cert, "rb") as f:
                    chain = load_certs_pem(f.read())
                if args.chain:
                    with open(args.chain, "rb") as f:
                        chain += load_certs_pem(f.read())
            out = args.out or default_sig_path(args.model)
            sign_model(args.model, key, out, args.method, args.hash, args.shard_size, args.ignore,
                       _parse_variants(args.variant), chain)
            print(f"signed {args.model} -> {out}")
        elif args.cmd == "verify":
            if (args.public_key is None) == (args.ca_bundle is None):
                print("oms_ref: give exactly one of --public-key / --ca-bundle", file=sys.stderr)
                return 2
            pk = ca = None
            if args.public_key:
                with open(args.public_key, "rb") as f:
                    pk = f.read()
            else:
                with open(args.ca_bundle, "rb") as f:
                    ca = f.read()
            st = verify_model(args.model, args.sig, pk, ca, args.ignore, args.ignore_unsigned_files)
            n = len(st["predicate"]["resources"])
            print(f"verification OK: {n} resources")
        elif args.cmd == "extract":
            p, s = extract_pae_and_sig(args.sig)
            with open(args.pae, "wb") as f:
                f.write(p)
            with open(args.sig_der, "wb") as f:
                f.write(s)
        return 0
    except OmsError as e:
        print(f"oms_ref: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"oms_ref: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
