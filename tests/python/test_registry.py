"""OCI registries as origins and as the target of `drun push`, against Debian's docker-registry
(the CNCF distribution registry) started here on loopback with TLS from a test CA: once with
htpasswd Basic auth, once behind a bearer-token service written here (JWTs the registry checks
against the service's certificate), and anonymous with an artifact that skopeo (another tool)
copied in. A hostile proxy in front of the registry flips bytes, drops Range, redirects blobs to
another host, and the tests swap layers and move tags. Trust comes from the bundle only."""

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import det_bytes
from test_fetch import free_port, make_ca_and_server_cert, node_key, same_tree, stored_pieces, wait_port  # noqa: F401

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
PIECE = 65536
USER, PASSWORD = "publisher", "s3cret-registry-pw"
SERVICE, ISSUER = "drun-test-registry", "drun-test-token-issuer"

# CI installs both (scripts/bootstrap.sh): there, a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(not Path(REGISTRY).exists() and not os.environ.get("CI"),
                                reason="docker-registry is not installed")


def start_tls_server(handler, pki):
    """A threading HTTPS server on a kernel-chosen loopback port; (server, port)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


class TokenService:
    """The Docker/OCI token flow's other half: checks Basic credentials and answers a JWT for the
    scope asked (or, wrong_scope, for another repository), signed with a key whose certificate
    the registry trusts. Records every request's query and whether it carried credentials."""

    def __init__(self, d, pki):
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=drun test token signer", "-keyout", d / "token.key", "-out",
                        d / "token.pem"], check=True, capture_output=True)
        self.cert = d / "token.pem"
        key = serialization.load_pem_private_key((d / "token.key").read_bytes(), None)
        der = x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        self.requests, self.wrong_scope = [], False
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                svc.requests.append({"scope": q.get("scope", [""])[0], "service": q.get("service", [""])[0],
                                     "auth": auth})
                want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if auth != want:
                    self.send_response(401)
                    self.end_headers()
                    return
                _, name, actions = q["scope"][0].split(":")
                if svc.wrong_scope:
                    name = "someone/else"
                now = int(time.time())
                claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "iat": now, "nbf": now - 5, "exp": now + 300,
                          "jti": uuid.uuid4().hex,
                          "access": [{"type": "repository", "name": name, "actions": actions.split(",")}]}
                token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": [base64.b64encode(der).decode()]})
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.srv, self.port = start_tls_server(Handler, pki)
        self.realm = f"https://127.0.0.1:{self.port}/token"

    def stop(self):
        self.srv.shutdown()


class Registry:
    """docker-registry in the foreground over TLS; auth None, "htpasswd" or a TokenService."""

    def __init__(self, tmp, pki, auth=None):
        self.dir = tmp / f"registry-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.ca = pki["ca"]
        auth_conf = ""
        if auth == "htpasswd":
            import warnings

            with warnings.catch_warnings():  # Python's crypt (deprecated) is libxcrypt's, which has bcrypt
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt

            # bcrypt at its lowest cost (4): the registry checks it on every request, and at
            # Python's default (12) a push of 40 requests took 8 s here, a minute on a loaded CI.
            (self.dir / "htpasswd").write_text(f"{USER}:{crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n")
            auth_conf = f"auth:\n  htpasswd:\n    realm: drun-test\n    path: {self.dir / 'htpasswd'}\n"
        elif auth is not None:
            auth_conf = (f"auth:\n  token:\n    realm: {auth.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                         f"    rootcertbundle: {auth.cert}\n")
        for attempt in range(5):  # the registry takes its port from its config: retry a taken one
            self.port = free_port()
            (self.dir / "config.yml").write_text(
                f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
                f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{self.port}\n  tls:\n"
                f"    certificate: {pki['cert']}\n    key: {pki['key']}\n{auth_conf}")
            self.proc = subprocess.Popen([REGISTRY, "serve", self.dir / "config.yml"], stdout=subprocess.DEVNULL,
                                         stderr=open(self.dir / "registry.log", "wb"))
            try:
                wait_port(self.port, self.proc)
                return
            except RuntimeError:
                self.proc.kill()
                self.proc.wait()
        raise RuntimeError("the registry did not start: " + (self.dir / "registry.log").read_text())

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def ref(self, repo_tag):
        return f"oci://{self.host}/{repo_tag}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    # A small anonymous client of the registry API, for what drun push would never do.
    def call(self, method, path, body=b"", headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port,
                                           context=ssl.create_default_context(cafile=str(self.ca)))
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def put_blob(self, repo, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, h, _ = self.call("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, status
        loc = urllib.parse.urlparse(h["Location"])
        status, _, body = self.call("PUT", f"{loc.path}?{loc.query}&digest={digest}", data,
                                    {"Content-Type": "application/octet-stream"})
        assert status == 201, (status, body)
        return digest

    def put_manifest(self, repo, ref, manifest, media_type="application/vnd.oci.image.manifest.v1+json"):
        data = json.dumps(manifest).encode()
        status, _, body = self.call("PUT", f"/v2/{repo}/manifests/{ref}", data, {"Content-Type": media_type})
        assert status == 201, (status, body)
        return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)

    def get_manifest(self, repo, ref):
        status, _, body = self.call("GET", f"/v2/{repo}/manifests/{ref}",
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert status == 200, status
        return json.loads(body)


@pytest.fixture
def pki(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture
def signed(drun, drun_keys, tmp_path):
    """A signed model with the bundle inside it (as a publisher keeps it): (model, sig, pub)."""
    m = tmp_path / "model"
    (m / "tok").mkdir(parents=True)
    (m / "weights.bin").write_bytes(det_bytes(20 * PIECE + 123, 7))
    (m / "extra.bin").write_bytes(det_bytes(2 * PIECE, 8))
    (m / "tok" / "vocab.json").write_bytes(b'{"a": 1}')
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", PIECE).ok()
    return m, m / "model.sig", pub


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("DRUN_REGISTRY_CREDENTIALS", f"{USER}:{PASSWORD}")


def pull(drun, reg, repo_tag, pub, store, ks, out=None, signature=None, extra=()):
    args = ["fetch", "--signature", signature or reg.ref(repo_tag), "--public-key", pub, "--origin", reg.ref(repo_tag),
            "--store", store, "--key-source", ks, "--ca-cert", reg.ca, "--attempts", 3, *extra]
    if out:
        args += ["--out", out]
    return drun(*args, timeout=120)


def test_push_then_fetch_through_a_registry_with_basic_auth(drun, tmp_path, pki, signed, node_key, creds, monkeypatch):
    m, sig, pub = signed
    reg = Registry(tmp_path, pki, auth="htpasswd")
    try:
        r = drun("push", m, reg.ref("models/demo:v1"), "--ca-cert", reg.ca, "--chunk-size", 100000).ok()
        pushed = r.out.strip()
        assert pushed.startswith(f"oci://{reg.host}/models/demo@sha256:"), r
        manifest_digest = pushed.split("@")[1]
        # What the registry holds: one layer per signed file, titled with its name, and the bundle.
        mf = None
        monkeypatch.delenv("DRUN_REGISTRY_CREDENTIALS")
        status, _, _ = reg.call("GET", "/v2/models/demo/manifests/v1")
        assert status == 401  # the registry really demands credentials
        monkeypatch.setenv("DRUN_REGISTRY_CREDENTIALS", f"{USER}:{PASSWORD}")
        auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        status, _, body = reg.call("GET", "/v2/models/demo/manifests/v1",
                                   headers={"Authorization": auth, "Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == manifest_digest
        mf = json.loads(body)
        assert mf["artifactType"] == "application/vnd.drun.model.v1"
        titles = {l["annotations"]["org.opencontainers.image.title"]: l for l in mf["layers"]}
        assert set(titles) == {"weights.bin", "extra.bin", "tok/vocab.json", "model.sig"}
        assert titles["weights.bin"]["digest"] == "sha256:" + hashlib.sha256((m / "weights.bin").read_bytes()).hexdigest()
        assert titles["model.sig"]["mediaType"].startswith("application/vnd.dev.sigstore.bundle")

        # Bundle and pieces from the registry; the output is the model.
        out = tmp_path / "out"
        pull(drun, reg, "models/demo:v1", pub, tmp_path / "store", node_key, out=out).ok()
        shutil.copy(sig, out / "model.sig")
        assert same_tree(m, out)
        # By digest too, and a second push uploads nothing.
        pull(drun, reg, pushed.split("/", 3)[3], pub, tmp_path / "store2", node_key).ok()
        r = drun("push", m, reg.ref("models/demo:v2"), "--ca-cert", reg.ca).ok()
        assert "0 blobs uploaded" in r.err and "5 already in the registry" in r.err, r

        # No credentials, wrong credentials: refused as a denial (exit 4), nothing stored.
        monkeypatch.delenv("DRUN_REGISTRY_CREDENTIALS")
        pull(drun, reg, "models/demo:v1", pub, tmp_path / "s3", node_key).fails(4, "asks for credentials")
        pull(drun, reg, "models/demo:v1", pub, tmp_path / "s3", node_key,
             signature=sig).fails(4, "asks for credentials")
        assert stored_pieces(drun, tmp_path / "s3", node_key) == 0
        monkeypatch.setenv("DRUN_REGISTRY_CREDENTIALS", f"{USER}:wrong")
        pull(drun, reg, "models/demo:v1", pub, tmp_path / "s4", node_key).fails(4, "401")
        drun("push", m, reg.ref("models/demo:v3"), "--ca-cert", reg.ca).fails(4)
    finally:
        reg.stop()


def test_bearer_tokens_scoped_to_the_repository_from_an_auth_file(drun, tmp_path, pki, signed, node_key):
    m, sig, pub = signed
    tokens = TokenService(tmp_path / "tokens", pki)
    reg = Registry(tmp_path, pki, auth=tokens)
    auth_file = tmp_path / "auth.json"
    entry = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {reg.host: {"auth": entry}, "other.example:5000": {"auth": "eDp5"}}}))
    auth_file.chmod(0o600)
    try:
        drun("push", m, reg.ref("team/demo:v1"), "--ca-cert", reg.ca, "--registry-auth", auth_file).ok()
        assert {r["scope"] for r in tokens.requests} == {"repository:team/demo:pull,push"}
        assert all(r["service"] == SERVICE for r in tokens.requests)
        tokens.requests.clear()
        out = tmp_path / "out"
        pull(drun, reg, "team/demo:v1", pub, tmp_path / "store", node_key, out=out,
             extra=["--registry-auth", auth_file]).ok()
        assert (out / "weights.bin").read_bytes() == (m / "weights.bin").read_bytes()
        assert {r["scope"] for r in tokens.requests} == {"repository:team/demo:pull"}

        # A token for another repository: the registry refuses it, drun says so (exit 4).
        tokens.wrong_scope = True
        pull(drun, reg, "team/demo:v1", pub, tmp_path / "s2", node_key, signature=sig,
             extra=["--registry-auth", auth_file]).fails(4, "401")
        assert stored_pieces(drun, tmp_path / "s2", node_key) == 0
        tokens.wrong_scope = False

        # An auth file others may read is refused before any request; one without an entry for
        # this registry means anonymous, which this registry refuses.
        auth_file.chmod(0o644)
        pull(drun, reg, "team/demo:v1", pub, tmp_path / "s3", node_key,
             extra=["--registry-auth", auth_file]).fails(2, "readable by its owner only")
        auth_file.chmod(0o600)
        auth_file.write_text(json.dumps({"auths": {"other.example:5000": {"auth": entry}}}))
        pull(drun, reg, "team/demo:v1", pub, tmp_path / "s4", node_key,
             extra=["--registry-auth", auth_file]).fails(4)
    finally:
        reg.stop()
        tokens.stop()


def oci_layout(root, model, files, tag):
    """An OCI image layout of the model's raw files (ModelPack media types, title annotations), as
    another tool writes one: (layout dir, manifest digest)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    layers = [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", **blob((model / f).read_bytes()),
               "annotations": {"org.opencontainers.image.title": f}} for f in files]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", **blob(b"{}")}, "layers": layers}
    md = blob(json.dumps(manifest).encode())
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **md,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return root, md


@pytest.mark.skipif(not Path(SKOPEO).exists() and not os.environ.get("CI"), reason="skopeo is not installed")
def test_fetch_an_artifact_that_skopeo_copied_in_with_the_bundle_as_a_referrer(drun, tmp_path, pki, signed, node_key):
    m, sig, pub = signed
    reg = Registry(tmp_path, pki)
    try:
        files = ["extra.bin", "tok/vocab.json", "weights.bin"]
        layout, md = oci_layout(tmp_path / "layout", m, files, "v1")
        certs = tmp_path / "skopeo-certs"
        certs.mkdir()
        shutil.copy(reg.ca, certs / "ca.crt")
        subprocess.run([SKOPEO, "copy", "--dest-cert-dir", certs, f"oci:{layout}:v1",
                        f"docker://{reg.host}/models/other:v1"], check=True, capture_output=True)
        # The bundle as an OCI 1.1 referrer; this registry has no referrers API, so the
        # sha256-<digest> tag lists it, as the spec's fallback says.
        bundle = sig.read_bytes()
        btype = "application/vnd.dev.sigstore.bundle.v0.3+json"
        empty = reg.put_blob("models/other", b"{}")
        referrer = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "artifactType": btype, "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                                      "digest": empty, "size": 2},
                    "layers": [{"mediaType": btype, "digest": reg.put_blob("models/other", bundle),
                                "size": len(bundle)}],
                    "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", **md}}
        rd, rs = reg.put_manifest("models/other", "ref1", referrer)
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": rd, "size": rs,
                                "artifactType": btype}]}
        reg.put_manifest("models/other", "sha256-" + md["digest"][7:], index, "application/vnd.oci.image.index.v1+json")
        out = tmp_path / "out"
        pull(drun, reg, "models/other:v1", pub, tmp_path / "store", node_key, out=out).ok()
        shutil.copy(sig, out / "model.sig")
        assert same_tree(m, out)
        # Without the referrer there is no bundle to find: not found (exit 3), nothing stored.
        layout2, _ = oci_layout(tmp_path / "layout2", m, files[:2], "v2")
        subprocess.run([SKOPEO, "copy", "--dest-cert-dir", certs, f"oci:{layout2}:v2",
                        f"docker://{reg.host}/models/other:v2"], check=True, capture_output=True)
        pull(drun, reg, "models/other:v2", pub, tmp_path / "s2", node_key).fails(3, "no referrer holds a sigstore bundle")
        # The bundle is checked, not only found: another file set is not what it signs.
        pull(drun, reg, "models/other:v2", pub, tmp_path / "s2", node_key, signature=sig).fails(
            3, 'no layer is titled "weights.bin"')
        assert stored_pieces(drun, tmp_path / "s2", node_key) <= 3  # only verified pieces of the files it has
    finally:
        reg.stop()


def swap_titles(manifest):
    for l in manifest["layers"]:
        t = l["annotations"]["org.opencontainers.image.title"]
        l["annotations"]["org.opencontainers.image.title"] = {"a.bin": "b.bin", "b.bin": "a.bin"}.get(t, t)


def pushed_with_swapped_layers(drun, drun_keys, tmp_path, reg, repo, size):
    """Two files of `size` bytes, signed and pushed to repo:v1, whose manifest is then rewritten
    with the two layers' titles swapped: (model, public key, the swapped manifest)."""
    m = tmp_path / "model"
    m.mkdir()
    (m / "a.bin").write_bytes(det_bytes(size, 1))
    (m / "b.bin").write_bytes(det_bytes(size, 2))
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", PIECE).ok()
    drun("push", m, reg.ref(f"{repo}:v1"), "--ca-cert", reg.ca).ok()
    mf = reg.get_manifest(repo, "v1")
    swap_titles(mf)
    reg.put_manifest(repo, "v1", mf)
    return m, pub, mf


def test_a_manifest_that_swaps_two_files_layers_is_refused(drun, tmp_path, pki, drun_keys, node_key):
    reg = Registry(tmp_path, pki)
    try:
        m, pub, mf = pushed_with_swapped_layers(drun, drun_keys, tmp_path, reg, "models/swap", 3 * PIECE)
        pull(drun, reg, "models/swap:v1", pub, tmp_path / "store", node_key, out=tmp_path / "out").fails(
            1, "digest mismatch")
        assert stored_pieces(drun, tmp_path / "store", node_key) == 0
        assert not (tmp_path / "out" / "a.bin").exists()
        # Layers the manifest says are shorter than the signed files: named, nothing fetched.
        swap_titles(mf)
        for l in mf["layers"]:
            l["size"] = l["size"] // 2 if l["size"] > 1000 else l["size"]
        status, _, _ = reg.call("PUT", "/v2/models/swap/manifests/short", json.dumps(mf).encode(),
                                {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if status == 201:  # distribution checks sizes against the blobs it holds; when it does not:
            pull(drun, reg, "models/swap:short", pub, tmp_path / "s2", node_key,
                 signature=m / "model.sig").fails(3, "the signed manifest reads up to byte")
    finally:
        reg.stop()


class HostileProxy:
    """TLS in front of a registry, forwarding every request (credentials included) and answering
    the way a broken or hostile registry would: mode "flip" flips a byte of every blob body,
    "no-range" drops the Range header, "redirect" sends blob GETs to a CDN on another origin
    (which records what headers reached it), "fail-patch" fails the second chunk of an upload
    once (as a dropped connection would) after passing it on: the registry has it, the client
    does not know, "referrers" answers the OCI 1.1 referrers API from `referrers` (subject
    digest -> index) and hides the sha256-<digest> tags of the fallback. Any other mode passes
    everything on; blob_gets counts the blob GETs."""

    def __init__(self, reg, pki, mode):
        self.mode, self.cdn_headers, self.patches, self.blob_gets = mode, [], 0, 0
        self.referrers, self.referrer_gets = {}, 0
        proxy = self

        class CDN(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                proxy.cdn_headers.append(dict(self.headers))
                # The CDN holds the blob (fetched from the registry with the proxy's own token-less
                # view: the proxy passes the original request's credentials in the query).
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                status, headers, body = reg.call("GET", q["p"][0], headers={
                    k: v for k, v in (("Range", self.headers.get("Range")), ("Authorization", q.get("a", [None])[0]))
                    if v})
                self.send_response(status)
                for k in ("Content-Range", "Content-Type"):
                    if k in headers:
                        self.send_header(k, headers[k])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def forward(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                # Host passes through: the registry's Location headers then point at the proxy.
                headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                is_blob = method == "GET" and "/blobs/sha256:" in self.path
                proxy.blob_gets += is_blob
                if is_blob and proxy.mode == "no-range":
                    headers.pop("Range", None)
                if is_blob and proxy.mode == "redirect":
                    target = (f"http://localhost:{proxy.cdn_port}/blob?p={urllib.parse.quote(self.path)}"
                              f"&a={urllib.parse.quote(self.headers.get('Authorization', ''))}")
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if proxy.mode == "referrers" and "/referrers/" in self.path:
                    proxy.referrer_gets += 1
                    index = proxy.referrers.get(self.path.rsplit("/", 1)[1])
                    data = json.dumps(index or {"schemaVersion": 2, "manifests": []}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if proxy.mode == "referrers" and "/manifests/sha256-" in self.path:
                    status, rh, data = 404, {}, b""
                else:
                    status, rh, data = reg.call(method, self.path, body, headers)
                if method == "PATCH" and proxy.mode == "fail-patch":
                    proxy.patches += 1
                    if proxy.patches == 2:
                        status, data = 500, b"chunk lost"
                if is_blob and proxy.mode == "flip" and data:
                    data = bytes([data[0] ^ 1]) + data[1:]
                self.send_response(status)
                for k, v in rh.items():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_GET(self):
                self.forward("GET")

            def do_HEAD(self):
                self.forward("HEAD")

            def do_POST(self):
                self.forward("POST")

            def do_PATCH(self):
                self.forward("PATCH")

            def do_PUT(self):
                self.forward("PUT")

        self.cdn = http.server.ThreadingHTTPServer(("localhost", 0), CDN)
        self.cdn_port = self.cdn.server_address[1]
        threading.Thread(target=self.cdn.serve_forever, daemon=True).start()
        self.srv, self.port = start_tls_server(Handler, pki)
        self.ca = reg.ca

    def ref(self, repo_tag):
        return f"oci://127.0.0.1:{self.port}/{repo_tag}"

    def stop(self):
        self.srv.shutdown()
        self.cdn.shutdown()


def test_a_layer_digest_other_than_the_signed_file_digest_is_refused_before_any_transfer(
        drun, tmp_path, pki, drun_keys, node_key):
    reg = Registry(tmp_path, pki)
    try:
        # One piece each: the piece is the file.
        m, pub, _ = pushed_with_swapped_layers(drun, drun_keys, tmp_path, reg, "models/one", PIECE // 2)
        proxy = HostileProxy(reg, pki, "count")
        try:
            r = pull(drun, proxy, "models/one:v1", pub, tmp_path / "store", node_key, out=tmp_path / "out",
                     signature=m / "model.sig").fails(1, "names other bytes than the bundle signs")
            assert 'the layer titled "a.bin"' in r.err, r
            assert proxy.blob_gets == 0  # refused from the manifest alone
        finally:
            proxy.stop()
        assert stored_pieces(drun, tmp_path / "store", node_key) == 0
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    finally:
        reg.stop()


def test_the_bundle_found_through_the_referrers_api(drun, tmp_path, pki, signed, node_key):
    m, sig, pub = signed
    reg = Registry(tmp_path, pki)
    try:
        drun("push", m, reg.ref("models/refs:v1"), "--ca-cert", reg.ca).ok()
        # The same artifact without its model.sig layer; the bundle is a referrer of it instead.
        mf = reg.get_manifest("models/refs", "v1")
        bundle_layers = [l for l in mf["layers"] if l["annotations"]["org.opencontainers.image.title"] == "model.sig"]
        mf["layers"] = [l for l in mf["layers"] if l not in bundle_layers]
        subject, size = reg.put_manifest("models/refs", "v2", mf)
        btype = "application/vnd.dev.sigstore.bundle.v0.3+json"
        bundle = sig.read_bytes()
        referrer = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "artifactType": btype, "config": mf["config"],
                    "layers": [{"mediaType": btype, "digest": reg.put_blob("models/refs", bundle), "size": len(bundle)}],
                    "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject,
                                "size": size}}
        rd, rs = reg.put_manifest("models/refs", "bundle", referrer)
        proxy = HostileProxy(reg, pki, "referrers")
        try:
            # A referrer of another type comes first in the index: it is passed over.
            proxy.referrers[subject] = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                        "manifests": [
                                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                             "digest": subject, "size": size, "artifactType": "application/x-sbom"},
                                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                             "digest": rd, "size": rs, "artifactType": btype}]}
            out = tmp_path / "out"
            pull(drun, proxy, "models/refs:v2", pub, tmp_path / "store", node_key, out=out).ok()
            assert proxy.referrer_gets == 1
            shutil.copy(sig, out / "model.sig")
            assert same_tree(m, out)
            # An API that lists no bundle: not found (exit 3), nothing stored.
            del proxy.referrers[subject]
            pull(drun, proxy, "models/refs:v2", pub, tmp_path / "s2", node_key).fails(
                3, "no referrer holds a sigstore bundle")
            assert stored_pieces(drun, tmp_path / "s2", node_key) == 0
        finally:
            proxy.stop()
    finally:
        reg.stop()


def test_a_hostile_registry_is_refused_or_recovered_and_nothing_unverified_is_stored(
        drun, tmp_path, pki, signed, node_key, creds):
    m, sig, pub = signed
    reg = Registry(tmp_path, pki, auth="htpasswd")
    try:
        drun("push", m, reg.ref("models/demo:v1"), "--ca-cert", reg.ca).ok()
        for mode, check in (("flip", lambda r: r.fails(1, "digest mismatch")),
                            ("no-range", lambda r: r.fails(3, "does it ignore Range")),
                            ("redirect", lambda r: r.ok())):
            proxy = HostileProxy(reg, pki, mode)
            try:
                store = tmp_path / f"store-{mode}"
                check(pull(drun, proxy, "models/demo:v1", pub, store, node_key, signature=sig))
                if mode != "redirect":
                    # Only pieces that verified (a file of one piece, when Range was ignored).
                    assert stored_pieces(drun, store, node_key) <= 3, mode
                else:
                    # The credentials went to the registry only, never to the CDN it redirected to.
                    assert proxy.cdn_headers and not any("Authorization" in h for h in proxy.cdn_headers)
                    pieces = json.loads(drun("manifest", sig, "--json").ok().out)["piece_count"]
                    assert stored_pieces(drun, store, node_key) == pieces
            finally:
                proxy.stop()
    finally:
        reg.stop()


def test_a_push_whose_chunk_failed_resumes_where_the_registry_says_it_stands(
        drun, tmp_path, pki, signed, node_key, creds):
    m, sig, pub = signed
    reg = Registry(tmp_path, pki, auth="htpasswd")
    proxy = HostileProxy(reg, pki, "fail-patch")
    try:
        r = drun("push", m, proxy.ref("models/resumed:v1"), "--ca-cert", reg.ca, "--chunk-size", 100000).ok()
        assert "1 resumed chunks" in r.err, r
        assert proxy.patches > 2
        out = tmp_path / "out"
        pull(drun, reg, "models/resumed:v1", pub, tmp_path / "store", node_key, out=out).ok()
        assert (out / "weights.bin").read_bytes() == (m / "weights.bin").read_bytes()
    finally:
        proxy.stop()
        reg.stop()


def test_a_tag_moved_during_a_fetch_changes_nothing_fetched(drun, drun_bin, tmp_path, pki, signed, drun_keys, node_key):
    m, sig, pub = signed
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(det_bytes(20 * PIECE + 123, 99))
    key, _ = drun_keys["ecdsa-p256"]
    drun("sign", other, "--key", key, "--piece-size", PIECE).ok()
    reg = Registry(tmp_path, pki)
    try:
        drun("push", m, reg.ref("models/moving:latest"), "--ca-cert", reg.ca).ok()
        args = ["fetch", "--signature", sig, "--public-key", pub, "--origin", reg.ref("models/moving:latest"),
                "--store", tmp_path / "store", "--key-source", node_key, "--ca-cert", reg.ca,
                "--limit-rate", 400000, "--out", tmp_path / "out"]
        p = subprocess.Popen([drun_bin, *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        time.sleep(1.0)
        drun("push", other, reg.ref("models/moving:latest"), "--ca-cert", reg.ca).ok()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert (tmp_path / "out" / "weights.bin").read_bytes() == (m / "weights.bin").read_bytes()
    finally:
        reg.stop()


def test_bad_references_are_named(drun, tmp_path, signed, node_key):
    m, sig, pub = signed
    for ref, why in (("oci://", "no REGISTRY/REPOSITORY"), ("oci://host:5000/Upper/case:v1", "lower-case"),
                     ("oci://host:5000/repo@sha256:abc", "64 lower-case hex"), ("oci://us@er:pw@host/repo", "host"),
                     ("oci://host/repo:bad tag", "tag")):
        drun("fetch", "--signature", sig, "--public-key", pub, "--origin", ref, "--store", tmp_path / "s",
             "--key-source", node_key).fails((2, 3), why)
        drun("push", m, ref).fails(2, why)
