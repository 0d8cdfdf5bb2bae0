"""drun token issue / jwks / verify against PyJWT, an independent JWT implementation.

PyJWT mints EdDSA, ES256 and RS256 tokens that `drun token verify` must accept (and expired,
wrong-audience, alg=none and tampered ones it must refuse), and PyJWT must accept what
`drun token issue` mints, checked against what `drun token jwks` publishes.

Tokens bound to a certificate (RFC 8705 cnf x5t#S256) are checked against thumbprints computed
here, hostile cnf claims are refused, and the replay of the security review is played out with
real processes: a fake peer whose certificate comes from the cluster CA captures the token from a
victim's HELLO and presents it to a real `drun serve` with its own certificate (refused), as well
as without one, and under each policy rule.

PyJWT may live in another interpreter than the one running pytest, so every PyJWT step runs in a
subprocess of the first interpreter found that imports `jwt` and `cryptography`; the module skips
when there is none. Every test needs DRUN_BIN (skips otherwise).
"""

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

AUD = "peers"
ID_A = "a" * 64
ID_B = "b" * 64

# Runs in the PyJWT interpreter: one JSON request on stdin, one JSON answer on stdout.
HELPER = r'''
import json, sys
import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

req = json.load(sys.stdin)
op = req["op"]
if op == "keygen":
    kind = req["kind"]
    if kind == "EdDSA":
        key, to_jwk = ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk
    elif kind == "ES256":
        key, to_jwk = ec.generate_private_key(ec.SECP256R1()), ECAlgorithm.to_jwk
    else:
        key, to_jwk = rsa.generate_private_key(public_exponent=65537, key_size=2048), RSAAlgorithm.to_jwk
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    out = {"private_pem": pem, "jwk": json.loads(to_jwk(key.public_key()))}
elif op == "encode":
    out = {"token": jwt.encode(req["payload"], req["private_pem"], algorithm=req["alg"],
                               headers=req.get("headers"))}
elif op == "decode":
    try:
        header = jwt.get_unverified_header(req["token"])
        keys = jwt.PyJWKSet.from_dict(req["jwks"])
        key = keys[header["kid"]] if "kid" in header else keys.keys[0]
        claims = jwt.decode(req["token"], key.key, algorithms=[header["alg"]], audience=req["audience"])
        out = {"claims": claims, "header": header}
    except Exception as e:  # the test asserts on the failure, whatever PyJWT raised
        out = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
'''


def _find_pyjwt():
    seen = set()
    for cand in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not cand or not os.path.exists(cand):
            continue
        real = os.path.realpath(cand)
        if real in seen:
            continue
        seen.add(real)
        try:
            ok = subprocess.run([cand, "-c", "import jwt, cryptography.hazmat.primitives.asymmetric.ed25519"],
                                capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cand
    return None


@pytest.fixture(scope="module")
def pyjwt():
    interp = _find_pyjwt()
    if not interp:
        pytest.skip("no Python interpreter with PyJWT (jwt) and cryptography found")

    def call(**req):
        p = subprocess.run([interp, "-c", HELPER], input=json.dumps(req).encode(), capture_output=True, timeout=120)
        assert p.returncode == 0, f"PyJWT helper failed: {p.stderr.decode(errors='replace')}"
        return json.loads(p.stdout)

    return call


@pytest.fixture
def token_cmd(drun_bin):
    """token_cmd(*args, stdin="") -> (rc, stdout, stderr) for `drun token ...`."""

    def run(*args, stdin=""):
        p = subprocess.run([drun_bin, "token", *[str(a) for a in args]], input=stdin.encode(), capture_output=True,
                           timeout=60)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    return run


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def claims(**extra):
    now = int(time.time())
    c = {"sub": "system:serviceaccount:ml:loader", "aud": AUD, "iat": now, "exp": now + 300,
         "drun_artifacts": [ID_A]}
    c.update(extra)
    return c


@pytest.fixture(scope="module")
def issuers(pyjwt, tmp_path_factory):
    """{alg: (private_pem, jwks_path)}: a PyJWT key pair per algorithm, its JWKS written to a file."""
    d = tmp_path_factory.mktemp("jwks")
    out = {}
    for alg in ("EdDSA", "ES256", "RS256"):
        k = pyjwt(op="keygen", kind=alg)
        jwk = dict(k["jwk"], kid=f"{alg.lower()}-1", use="sig", alg=alg)
        path = d / f"{alg}.json"
        path.write_text(json.dumps({"keys": [jwk]}))
        out[alg] = (k["private_pem"], path, jwk["kid"])
    # One set holding all three, as an identity provider publishes it.
    every = d / "all.json"
    every.write_text(json.dumps({"keys": [json.loads(out[a][1].read_text())["keys"][0] for a in out]}))
    out["all"] = every
    return out


def mint(pyjwt, issuers, alg, payload, kid=True):
    pem, _, key_id = issuers[alg]
    return pyjwt(op="encode", payload=payload, private_pem=pem, alg=alg,
                 headers={"kid": key_id} if kid else None)["token"]


def assert_refused(rc, out, err, fragment, token):
    assert rc == 1, (rc, out, err)
    assert fragment.lower() in err.lower(), err
    assert out == "", out
    # The message says what failed and never quotes the token (nor its signature).
    sig = token.split(".")[2]
    assert token not in err and (len(sig) < 8 or sig not in err), err


# ------------------------------------------------------------------------------------------------
# PyJWT mints, drun verifies


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_pyjwt_tokens_verify(token_cmd, pyjwt, issuers, alg):
    payload = claims(iss="https://issuer.example")
    token = mint(pyjwt, issuers, alg, payload)
    for jwks in (issuers[alg][1], issuers["all"]):
        rc, out, err = token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=token + "\n")
        assert rc == 0, err
        assert "subject:   system:serviceaccount:ml:loader" in out
        assert "issuer:    https://issuer.example" in out
        exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(payload["exp"]))
        assert f"expires:   {exp}" in out, out
        assert ID_A in out
    # Without a kid, the key is found by type.
    rc, out, err = token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD,
                             stdin=mint(pyjwt, issuers, alg, claims(), kid=False))
    assert rc == 0, err
    # An audience list holding ours.
    rc, out, err = token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD,
                             stdin=mint(pyjwt, issuers, alg, claims(aud=["x", AUD])))
    assert rc == 0, err


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_pyjwt_bad_tokens_are_refused(token_cmd, pyjwt, issuers, alg):
    jwks = issuers["all"]
    now = int(time.time())
    expired = mint(pyjwt, issuers, alg, claims(iat=now - 7200, exp=now - 3600))
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=expired), "expired", expired)
    early = mint(pyjwt, issuers, alg, claims(nbf=now + 3600, exp=now + 7200))
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=early), "not yet valid", early)
    wrong_aud = mint(pyjwt, issuers, alg, claims(aud="someone-else"))
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=wrong_aud), "wrong audience",
                   wrong_aud)
    # The payload swapped for another, the signature kept.
    h, p, s = mint(pyjwt, issuers, alg, claims()).split(".")
    forged_payload = json.loads(unb64url(p))
    forged_payload["sub"] = "admin"
    forged = ".".join([h, b64url(json.dumps(forged_payload).encode()), s])
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=forged), "bad signature", forged)
    # The key of another algorithm named by kid.
    other = "EdDSA" if alg != "EdDSA" else "RS256"
    h, p, s = mint(pyjwt, issuers, alg, claims()).split(".")
    header = json.loads(unb64url(h))
    header["kid"] = issuers[other][2]
    confused = ".".join([b64url(json.dumps(header).encode()), p, s])
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=confused), "cannot verify", confused)


def test_alg_none_and_unknown_kid_are_refused(token_cmd, pyjwt, issuers):
    payload = b64url(json.dumps(claims()).encode())
    none = b64url(b'{"alg":"none","typ":"JWT"}') + "." + payload + "."
    rc, out, err = token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD, stdin=none)
    assert rc == 1 and 'unsupported alg "none"' in err, (rc, err)
    h, p, s = mint(pyjwt, issuers, "EdDSA", claims()).split(".")
    header = json.loads(unb64url(h))
    header["kid"] = "no-such-key"
    unknown = ".".join([b64url(json.dumps(header).encode()), p, s])
    assert_refused(*token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD, stdin=unknown),
                   'no key with kid "no-such-key"', unknown)
    big = "a" * 9000 + "." + payload + ".x"
    rc, out, err = token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD, stdin=big)
    assert rc == 1 and "at most 8192" in err, (rc, err)
    padded = ".".join([h + "=", p, s])
    rc, out, err = token_cmd("verify", "--jwks", issuers["all"], "--audience", AUD, stdin=padded)
    assert rc == 1 and "base64url" in err, (rc, err)


# ------------------------------------------------------------------------------------------------
# drun mints, PyJWT verifies; and PyJWT signs with drun's keys, drun verifies


def test_drun_issue_verifies_with_pyjwt(token_cmd, pyjwt, drun_keys, tmp_path):
    key, pub = drun_keys["ed25519"]
    rc, jwks_text, err = token_cmd("jwks", "--public-key", pub)
    assert rc == 0, err
    jwks = json.loads(jwks_text)
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["alg"] == "EdDSA" and jwks["keys"][0]["use"] == "sig"
    rc, out, err = token_cmd("issue", "--key", key, "--subject", "node-7", "--audience", AUD, "--artifact", ID_A,
                             "--artifact", ID_B, "--ttl", "15m", "--unbound")
    assert rc == 0, err
    token = out.strip()
    assert out.count("\n") == 1 and token.count(".") == 2
    got = pyjwt(op="decode", token=token, jwks=jwks, audience=AUD)
    assert "error" not in got, got
    c = got["claims"]
    assert c["sub"] == "node-7" and c["aud"] == AUD and c["iss"] == "drun"
    assert c["drun_artifacts"] == [ID_A, ID_B]
    assert "cnf" not in c  # --unbound: a bearer token
    assert c["exp"] - c["iat"] == 900 and abs(c["iat"] - time.time()) < 60
    assert got["header"] == {"alg": "EdDSA", "kid": jwks["keys"][0]["kid"], "typ": "JWT"}
    # PyJWT refuses it for another audience too: the claim is really there.
    assert "error" in pyjwt(op="decode", token=token, jwks=jwks, audience="other")
    # And drun verifies its own token against its own JWKS.
    (tmp_path / "jwks.json").write_text(jwks_text)
    rc, out, err = token_cmd("verify", "--jwks", tmp_path / "jwks.json", "--audience", AUD, stdin=token)
    assert rc == 0 and "subject:   node-7" in out, err

    for ttl, secs in (("90s", 90), ("90", 90), ("2h", 7200)):
        rc, out, err = token_cmd("issue", "--key", key, "--subject", "s", "--audience", AUD, "--artifact", "*",
                                 "--ttl", ttl, "--unbound")
        assert rc == 0, err
        c = pyjwt(op="decode", token=out.strip(), jwks=jwks, audience=AUD)["claims"]
        assert c["exp"] - c["iat"] == secs and c["drun_artifacts"] == ["*"]


@pytest.mark.parametrize("ktype,alg", [("ed25519", "EdDSA"), ("ecdsa-p256", "ES256")])
def test_pyjwt_signs_with_drun_keys(token_cmd, pyjwt, drun_keys, tmp_path, ktype, alg):
    key, pub = drun_keys[ktype]
    rc, jwks_text, err = token_cmd("jwks", "--public-key", pub)
    assert rc == 0, err
    (tmp_path / "jwks.json").write_text(jwks_text)
    kid = json.loads(jwks_text)["keys"][0]["kid"]
    token = pyjwt(op="encode", payload=claims(), private_pem=key.read_text(), alg=alg, headers={"kid": kid})["token"]
    rc, out, err = token_cmd("verify", "--jwks", tmp_path / "jwks.json", "--audience", AUD, stdin=token)
    assert rc == 0, err
    assert "subject:   system:serviceaccount:ml:loader" in out


# ------------------------------------------------------------------------------------------------
# usage errors


def test_token_cli_usage_errors(token_cmd, drun_bin, drun_keys, tmp_path):
    ed_key, ed_pub = drun_keys["ed25519"]
    ec_key, _ = drun_keys["ecdsa-p256"]
    base = ["--subject", "s", "--audience", AUD, "--artifact", "*", "--unbound"]
    rc, out, err = token_cmd("issue", "--key", ec_key, *base)
    assert rc == 2 and "Ed25519" in err and out == "", err
    for bad in ("15x", "m", "-5", "25h", "0"):
        rc, out, err = token_cmd("issue", "--key", ed_key, *base, "--ttl", bad)
        assert rc == 2 and out == "", (bad, err)
    rc, out, err = token_cmd("issue", "--key", ed_key, "--subject", "s", "--audience", AUD, "--unbound")
    assert rc == 2 and "--artifact" in err
    rc, out, err = token_cmd("issue", "--key", ed_key, "--subject", "s", "--audience", AUD, "--artifact", "ABC",
                             "--unbound")
    assert rc == 2 and out == ""
    rc, out, err = token_cmd("verify", "--jwks", tmp_path / "absent.json", "--audience", AUD, stdin="x.y.z")
    assert rc == 3 and "absent.json" in err
    (tmp_path / "jwks.json").write_text(token_cmd("jwks", "--public-key", ed_pub)[1])
    rc, out, err = token_cmd("verify", "--jwks", tmp_path / "jwks.json", "--audience", AUD, stdin="")
    assert rc == 2 and "stdin" in err
    rc, out, err = token_cmd("verify", "--jwks", tmp_path / "jwks.json", stdin="x.y.z")
    assert rc == 2 and "--audience" in err
    rc, out, err = token_cmd()
    assert rc == 2 and "issue, jwks or verify" in err
    p384_key = tmp_path / "p384.key"
    subprocess.run([drun_bin, "keygen", "--type", "ecdsa-p384", "--out", p384_key], check=True,
                   capture_output=True)
    rc, out, err = token_cmd("jwks", "--public-key", str(p384_key) + ".pub")
    assert rc == 2 and "P-256" in err


# ------------------------------------------------------------------------------------------------
# certificate-bound tokens (RFC 8705 cnf x5t#S256) and the issuer check, at the CLI


def thumbprint(cert_pem):
    """x5t#S256 computed here, independently of drun: openssl for the DER, hashlib for SHA-256."""
    der = subprocess.run(["openssl", "x509", "-in", str(cert_pem), "-outform", "DER"], check=True,
                         capture_output=True).stdout
    return b64url(hashlib.sha256(der).digest())


@pytest.fixture
def holders(tmp_path):
    """A CA and two node certificates from it: {"pki", "holder": (cert, key), "other": (cert, key)}."""
    from peerkit import PKI
    pki = PKI(tmp_path / "pki")
    return {"pki": pki, "holder": pki.issue("holder"), "other": pki.issue("other")}


def test_drun_issues_certificate_bound_tokens(token_cmd, pyjwt, drun_keys, holders, tmp_path):
    key, pub = drun_keys["ed25519"]
    rc, jwks_text, err = token_cmd("jwks", "--public-key", pub)
    assert rc == 0, err
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(jwks_text)
    holder, other = holders["holder"][0], holders["other"][0]
    rc, out, err = token_cmd("issue", "--key", key, "--subject", "node-7", "--audience", AUD, "--artifact", ID_A,
                             "--bind-cert", holder)
    assert rc == 0, err
    token = out.strip()
    # PyJWT sees the confirmation claim, and it is the thumbprint computed here.
    got = pyjwt(op="decode", token=token, jwks=json.loads(jwks_text), audience=AUD)
    assert got["claims"]["cnf"] == {"x5t#S256": thumbprint(holder)}, got
    # A chain file binds to its first certificate, the leaf a TLS client sends.
    chain = tmp_path / "chain.pem"
    chain.write_text(holder.read_text() + holders["pki"].ca.read_text())
    rc, out, err = token_cmd("issue", "--key", key, "--subject", "node-7", "--audience", AUD, "--artifact", ID_A,
                             "--bind-cert", chain)
    assert rc == 0, err
    assert pyjwt(op="decode", token=out.strip(), jwks=json.loads(jwks_text), audience=AUD)["claims"]["cnf"] == \
        {"x5t#S256": thumbprint(holder)}

    # drun token verify checks the binding against the certificate it would be presented with.
    rc, out, err = token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--cert", holder, stdin=token)
    assert rc == 0, err
    assert f"bound to:  the certificate with x5t#S256 {thumbprint(holder)}" in out, out
    rc, out, err = token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--cert", holder, "--require-bound",
                             stdin=token)
    assert rc == 0, err
    assert_refused(*token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--cert", other, stdin=token),
                   "token is bound to another certificate", token)
    assert_refused(*token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, stdin=token),
                   "no client certificate was presented", token)

    # An unbound token says so, and --require-bound refuses it.
    rc, out, err = token_cmd("issue", "--key", key, "--subject", "s", "--audience", AUD, "--artifact", "*",
                             "--unbound")
    bearer = out.strip()
    rc, out, err = token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--cert", other, stdin=bearer)
    assert rc == 0 and "bound to:  nothing (a bearer token)" in out, (out, err)
    assert_refused(*token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--require-bound", stdin=bearer),
                   "not bound to a certificate", bearer)

    # Bound or bearer must be said; the certificate must be one.
    base = ["issue", "--key", key, "--subject", "s", "--audience", AUD, "--artifact", "*"]
    rc, out, err = token_cmd(*base)
    assert rc == 2 and "--bind-cert" in err and "--unbound" in err and out == "", err
    rc, out, err = token_cmd(*base, "--unbound", "--bind-cert", holder)
    assert rc == 2 and out == "", err
    rc, out, err = token_cmd(*base, "--bind-cert", tmp_path / "absent.pem")
    assert rc == 3 and "absent.pem" in err and out == "", err
    rc, out, err = token_cmd(*base, "--bind-cert", holders["holder"][1])  # the key, not the certificate
    assert rc == 2 and "no PEM certificate" in err and out == "", err
    rc, out, err = token_cmd("verify", "--jwks", jwks_path, "--audience", AUD, "--cert", tmp_path / "absent.pem",
                             stdin=token)
    assert rc == 3 and "absent.pem" in err, err


def test_pyjwt_bound_tokens_and_hostile_cnf_claims(token_cmd, pyjwt, issuers, holders):
    holder, other = holders["holder"][0], holders["other"][0]
    jwks = issuers["all"]
    thumb = thumbprint(holder)
    # Minted by PyJWT with a thumbprint computed here: drun agrees on what it means.
    for alg in ("EdDSA", "ES256", "RS256"):
        token = mint(pyjwt, issuers, alg, claims(cnf={"x5t#S256": thumb}))
        rc, out, err = token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--cert", holder, stdin=token)
        assert rc == 0 and thumb in out, (alg, err)
        assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--cert", other, stdin=token),
                       "bound to another certificate", token)
    hostile = [
        ("a string", thumb, 'claim "cnf" is not a JSON object'),
        ("null", None, 'claim "cnf" is not a JSON object'),
        ("empty", {}, "names no confirmation method"),
        ("number", {"x5t#S256": 7}, '"x5t#S256" is not a string'),
        ("short", {"x5t#S256": thumb[:20]}, "is not a certificate thumbprint"),
        ("padded", {"x5t#S256": thumb + "="}, "is not a certificate thumbprint"),
        ("hex", {"x5t#S256": hashlib.sha256(b"x").hexdigest()}, "is not a certificate thumbprint"),
        ("SHA-1 x5t", {"x5t": thumb}, 'cnf "x5t", a method drun cannot check'),
        ("DPoP jkt", {"jkt": thumb}, 'cnf "jkt", a method drun cannot check'),
        ("x5t#S256 and a jwk", {"x5t#S256": thumb, "jwk": {"kty": "OKP"}}, 'cnf "jwk"'),
    ]
    for name, cnf, fragment in hostile:
        token = mint(pyjwt, issuers, "ES256", claims(cnf=cnf))
        rc, out, err = token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--cert", holder, stdin=token)
        assert rc == 1 and fragment in err and out == "", (name, rc, err)
        assert token not in err


def test_issuer_is_checked_exactly_when_named(token_cmd, pyjwt, issuers):
    jwks = issuers["all"]
    good = mint(pyjwt, issuers, "EdDSA", claims(iss="https://issuer.example"))
    rc, out, err = token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--issuer", "https://issuer.example",
                             stdin=good)
    assert rc == 0, err
    wrong = mint(pyjwt, issuers, "EdDSA", claims(iss="https://evil.example"))
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--issuer", "https://issuer.example",
                              stdin=wrong),
                   'wrong issuer: the token\'s "iss" is "https://evil.example", not "https://issuer.example"', wrong)
    missing = mint(pyjwt, issuers, "EdDSA", claims())
    assert_refused(*token_cmd("verify", "--jwks", jwks, "--audience", AUD, "--issuer", "https://issuer.example",
                              stdin=missing),
                   'token has no "iss" claim', missing)
    # Without --issuer, any issuer whose key is in the set.
    rc, out, err = token_cmd("verify", "--jwks", jwks, "--audience", AUD, stdin=wrong)
    assert rc == 0 and "issuer:    https://evil.example" in out, err


# ------------------------------------------------------------------------------------------------
# the replay: a CA-certified node that a victim dials captures its token from the HELLO and
# presents it to a real `drun serve` with its own certificate

HELLO, GET_BUNDLE = 0x01, 0x02
WELCOME, BODY, DATA, ERROR = 0x81, 0x82, 0x83, 0x84
UNAUTHENTICATED, DENIED = 3, 4


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _read_frame(sock):
    ftype, length = struct.unpack(">BI", _recv_exact(sock, 5))
    assert length <= (1 << 20) + 1024, f"frame 0x{ftype:02x} of {length} bytes"
    return ftype, _recv_exact(sock, length)


def _hello(token):
    body = b"DRUN" + struct.pack(">HH", 1, len(token)) + token
    return struct.pack(">BI", HELLO, len(body)) + body


class TokenThief:
    """A fake peer: a TLS 1.3 server whose certificate comes from the peers' CA (as any node's in
    the cluster does), so a drun client dials it like any peer. It keeps the token of every HELLO
    it receives and hangs up."""

    def __init__(self, pki):
        self.cert, self.key = pki.issue("thief", uri="spiffe://cluster/ns/ml/sa/thief")
        self.ca = pki.ca
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.load_verify_locations(str(pki.ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.tokens = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                raw, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                raw.settimeout(5)
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    ftype, body = _read_frame(s)
                    if ftype == HELLO and body[:4] == b"DRUN":
                        (n,) = struct.unpack(">H", body[6:8])
                        self.tokens.append(body[8:8 + n])
            except (OSError, EOFError, ssl.SSLError, struct.error):
                pass

    def stop(self):
        self.stopping = True
        self.listener.close()
        self.thread.join(timeout=5)

    def replay(self, port, token, cert=True, artifact=None):
        """Presents `token` to the server on `port`, with the thief's own certificate (or none).
        -> ("refused", code, message) for an ERROR to the HELLO; else, with `artifact`, GET_BUNDLE:
        ("denied", code, message) or ("served", bundle bytes); without, ("welcome", None, None)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(str(self.ca))
        if cert:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(_hello(token))
            ftype, body = _read_frame(s)
            if ftype == ERROR:
                return "refused", struct.unpack(">H", body[:2])[0], body[2:].decode()
            assert ftype == WELCOME, f"expected WELCOME or ERROR, got 0x{ftype:02x}"
            if artifact is None:
                return "welcome", None, None
            s.sendall(struct.pack(">BI", GET_BUNDLE, 32) + bytes.fromhex(artifact))
            ftype, body = _read_frame(s)
            if ftype == ERROR:
                return "denied", struct.unpack(">H", body[:2])[0], body[2:].decode()
            assert ftype == BODY, f"expected BODY or ERROR, got 0x{ftype:02x}"
            (total,) = struct.unpack(">Q", body)
            out = bytearray()
            while len(out) < total:
                ftype, chunk = _read_frame(s)
                assert ftype == DATA
                out += chunk
            return "served", bytes(out), None


@pytest.fixture
def replay_world(drun, drun_bin, drun_keys, tmp_path):
    """A PKI, a signed model in a seed store, an issuer key and its JWKS, the victim's node
    certificate (its SPIFFE ID is bound to a reader role), the thief, and policies."""
    from peerkit import PKI, Serve, seeded_store, signed_model

    pki = PKI(tmp_path / "pki")
    key, pub = drun_keys["ecdsa-p256"]
    model, sig, artifact = signed_model(drun, tmp_path / "model", key, size=1 << 20, piece=256 << 10)
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    ks = f"file:{tmp_path / 'node.key'}"
    seeded_store(drun, tmp_path / "seed", ks, model, sig, pub)
    issuer = tmp_path / "issuer.key"
    drun("keygen", "--type", "ed25519", "--out", issuer).ok()
    (tmp_path / "jwks.json").write_text(drun("token", "jwks", "--public-key", f"{issuer}.pub").ok().out)

    class W:
        pass

    w = W()
    w.tmp, w.artifact, w.sig, w.pub, w.ks, w.ca = tmp_path, artifact, sig, pub, ks, pki.ca
    w.victim_cert, w.victim_key = pki.issue("victim", uri="spiffe://cluster/ns/ml/sa/loader")
    w.seed_cert, w.seed_key = pki.issue("seed", uri="spiffe://cluster/ns/ml/sa/seed")
    w.thief = TokenThief(pki)
    w.servers = []

    def token(name, *args):
        out = drun("token", "issue", "--key", issuer, "--subject", "loader", "--audience", "drun",
                   "--artifact", artifact, *args).ok().out.strip()
        path = tmp_path / name
        path.write_text(out + "\n")
        os.chmod(path, 0o600)
        return path

    w.bound = token("bound.jwt", "--bind-cert", w.victim_cert)
    w.unbound = token("unbound.jwt", "--unbound")
    w.token = token

    def policy(name, **top):
        doc = dict(top)
        doc["roles"] = {"reader": {"artifacts": [artifact]}}
        doc["bindings"] = [{"token": {"subject": "loader"}, "roles": ["reader"]},
                           {"certificate": {"uri": "spiffe://cluster/ns/ml/sa/loader"}, "roles": ["reader"]}]
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    w.policy = policy

    def serve(*extra):
        srv = Serve(drun_bin, tmp_path / "seed", ks, w.seed_cert, w.seed_key, pki.ca,
                    extra=["--jwks", tmp_path / "jwks.json", *extra])
        w.servers.append(srv)
        return srv

    w.serve = serve

    def fetch(peer, token_file, store, cert=True):
        args = ["fetch", "--signature", sig, "--public-key", pub, "--store", tmp_path / store, "--key-source", ks,
                "--ca-cert", pki.ca, "--peer", peer, "--token-file", token_file]
        if cert:
            args += ["--tls-cert", w.victim_cert, "--tls-key", w.victim_key]
        return drun(*args, timeout=120)

    w.fetch = fetch

    def capture(token_file, store):
        """The victim fetches from the thief (which answers nothing): the thief has its token."""
        before = len(w.thief.tokens)
        fetch(w.thief.addr, token_file, store).fails((3, 4))
        assert len(w.thief.tokens) > before, "the fake peer received no HELLO"
        got = w.thief.tokens[-1]
        assert got == token_file.read_text().strip().encode(), "the HELLO carried another token"
        return got

    w.capture = capture
    yield w
    w.thief.stop()
    for srv in w.servers:
        if srv.proc.poll() is None:
            srv.kill()


def test_a_captured_bound_token_replayed_with_another_certificate_is_refused(replay_world):
    w = replay_world
    # The most permissive policy: roles add up and unbound tokens are allowed, so a replayed
    # bearer token would work (the control below shows that it does).
    seed = w.serve("--policy", w.policy("union.json", combine="union", tokens={"require_binding": False}))
    stolen = w.capture(w.bound, "leech-a")
    kind, code, message = w.thief.replay(seed.port, stolen, artifact=w.artifact)
    assert (kind, code) == ("refused", UNAUTHENTICATED), (kind, code, message)
    assert "token is bound to another certificate" in message, message
    # Its holder, with its certificate, uses it as before.
    w.fetch(seed.addr, w.bound, "leech-b").ok()

    # Control: the same capture of an unbound token is replayed successfully, which is the attack.
    stolen_bearer = w.capture(w.unbound, "leech-c")
    kind, bundle, _ = w.thief.replay(seed.port, stolen_bearer, artifact=w.artifact)
    assert kind == "served" and bundle == w.sig.read_bytes(), kind
    stats = seed.stop()
    assert stats["handshakes_refused"] >= 2, stats  # the probe and the bound replay
    assert "eyJ" not in seed.out + seed.err  # tokens are never logged


def test_a_replayed_bearer_token_gains_nothing_under_the_default_policy_rules(replay_world):
    w = replay_world
    # Intersection (the default): the thief's certificate matches no binding, so the pair grants
    # nothing, whatever the token grants.
    seed = w.serve("--policy", w.policy("default.json"))
    stolen = w.capture(w.unbound, "leech-a")
    kind, code, message = w.thief.replay(seed.port, stolen, artifact=w.artifact)
    assert (kind, code) == ("denied", DENIED), (kind, code, message)
    assert "no binding of the access policy matches its certificate" in message, message
    assert "intersection" in message, message
    w.fetch(seed.addr, w.unbound, "leech-b").ok()  # certificate and token both grant it
    seed.stop()

    # Union without a "tokens" section: bound tokens are required, so the bearer token is denied
    # and the bound one works for its holder.
    seed = w.serve("--policy", w.policy("union.json", combine="union"))
    kind, code, message = w.thief.replay(seed.port, stolen, artifact=w.artifact)
    assert (kind, code) == ("denied", DENIED) and "requires bound tokens" in message, (kind, code, message)
    w.fetch(seed.addr, w.bound, "leech-c").ok()
    r = w.fetch(seed.addr, w.unbound, "leech-d")
    r.fails(4, "requires bound tokens")
    seed.stop()

    # tokens.issuer in a policy: drun's tokens say "drun"; a policy naming another issuer refuses them.
    seed = w.serve("--policy", w.policy("issuer.json", tokens={"issuer": "https://idp.example"}))
    w.fetch(seed.addr, w.bound, "leech-e").fails(4, 'issuer "drun" is not "https://idp.example"')
    seed.stop()


def test_server_options_token_only_callers_and_issuer(replay_world):
    w = replay_world
    # Token-only callers allowed, bound tokens and an issuer required, no policy file.
    seed = w.serve("--allow-token-only", "--require-bound-tokens", "--token-issuer", "drun")
    stolen = w.capture(w.bound, "leech-a")
    kind, code, message = w.thief.replay(seed.port, stolen, cert=False)
    assert (kind, code) == ("refused", UNAUTHENTICATED), (kind, code, message)
    assert "no client certificate was presented" in message, message
    kind, code, message = w.thief.replay(seed.port, stolen)
    assert kind == "refused" and "bound to another certificate" in message, (kind, message)
    stolen_bearer = w.capture(w.unbound, "leech-b")
    kind, code, message = w.thief.replay(seed.port, stolen_bearer, cert=False)
    assert kind == "refused" and "not bound to a certificate" in message, (kind, message)
    # The holder, with its certificate: served.
    w.fetch(seed.addr, w.bound, "leech-c").ok()
    # Another issuer: refused at the handshake.
    other = w.token("other-iss.jwt", "--bind-cert", w.victim_cert, "--issuer", "https://idp.example")
    w.fetch(seed.addr, other, "leech-d").fails(4, "wrong issuer")
    stats = seed.stop()
    assert stats["handshakes_refused"] >= 5, stats
    assert "eyJ" not in seed.out + seed.err
