"""drun token issue / jwks / verify against PyJWT, an independent JWT implementation.

PyJWT mints EdDSA, ES256 and RS256 tokens that `drun token verify` must accept (and expired,
wrong-audience, alg=none and tampered ones it must refuse), and PyJWT must accept what
`drun token issue` mints, checked against what `drun token jwks` publishes.

PyJWT may live in another interpreter than the one running pytest, so every PyJWT step runs in a
subprocess of the first interpreter found that imports `jwt` and `cryptography`; the module skips
when there is none. Every test needs DRUN_BIN (skips otherwise).
"""

import base64
import json
import os
import shutil
import subprocess
import sys
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
                             "--artifact", ID_B, "--ttl", "15m")
    assert rc == 0, err
    token = out.strip()
    assert out.count("\n") == 1 and token.count(".") == 2
    got = pyjwt(op="decode", token=token, jwks=jwks, audience=AUD)
    assert "error" not in got, got
    c = got["claims"]
    assert c["sub"] == "node-7" and c["aud"] == AUD and c["iss"] == "drun"
    assert c["drun_artifacts"] == [ID_A, ID_B]
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
                                 "--ttl", ttl)
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
    base = ["--subject", "s", "--audience", AUD, "--artifact", "*"]
    rc, out, err = token_cmd("issue", "--key", ec_key, *base)
    assert rc == 2 and "Ed25519" in err and out == "", err
    for bad in ("15x", "m", "-5", "25h", "0"):
        rc, out, err = token_cmd("issue", "--key", ed_key, *base, "--ttl", bad)
        assert rc == 2 and out == "", (bad, err)
    rc, out, err = token_cmd("issue", "--key", ed_key, "--subject", "s", "--audience", AUD)
    assert rc == 2 and "--artifact" in err
    rc, out, err = token_cmd("issue", "--key", ed_key, "--subject", "s", "--audience", AUD, "--artifact", "ABC")
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
