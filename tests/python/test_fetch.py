"""drun fetch against real origins started here on loopback: nginx over HTTP and HTTPS (with a test
CA made by openssl), and a hostile origin (Python's http.server) that flips bytes, fails, or
ignores Range. Every test checks that nothing unverified is stored or materialized."""

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import det_bytes

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PIECE = 65536


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca_and_server_cert(d, name="drun test CA"):
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", d / "ca.key", "-out", d / "ca.pem")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", d / "server.key", "-out", d / "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", d / "ext.cnf", "-out", d / "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def issue_client_cert(d, name):
    """A client certificate (clientAuth) from the CA that make_ca_and_server_cert made in d."""
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.cnf"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", key, "-out", csr)
    ext.write_text("extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", d / "ca.pem", "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", cert)
    os.chmod(key, 0o600)
    return cert, key


class Nginx:
    """nginx in the foreground, one process, serving `root` over HTTP and HTTPS on loopback."""

    def __init__(self, tmp, root, tls_protocols="TLSv1.3", client_ca=None):
        """client_ca: also serve `root` on mtls_port, to callers whose certificate chains to it
        (ssl_verify_client on), logging each request's client certificate to mtls_log."""
        self.dir = tmp / "nginx"
        self.dir.mkdir()
        self.ca, cert, key = make_ca_and_server_cert(self.dir / "pki")
        self.port, self.tls_port = free_port(), free_port()
        self.log = self.dir / "access.log"
        self.mtls_port, self.mtls_log = (free_port(), self.dir / "mtls.log") if client_ca else (None, None)
        mtls = "" if not client_ca else f"""
  log_format client '$request_method $uri $status $body_bytes_sent [$ssl_client_verify] [$ssl_client_s_dn]';
  server {{ listen 127.0.0.1:{self.mtls_port} ssl; root {root}; access_log {self.mtls_log} client;
           ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;
           ssl_client_certificate {client_ca}; ssl_verify_client on; }}"""
        temp = "\n".join(f"{k}_temp_path {self.dir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""
master_process off; daemon off; pid {self.dir / 'nginx.pid'}; error_log {self.dir / 'error.log'};
events {{ worker_connections 256; }}
http {{
  {temp}
  log_format bytes '$request_method $uri $status $body_bytes_sent $server_protocol $connection';
  access_log {self.log} bytes;
  server {{ listen 127.0.0.1:{self.port}; root {root}; }}
  server {{ listen 127.0.0.1:{self.tls_port} ssl http2; root {root};
           ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols {tls_protocols}; }}{mtls}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([NGINX, "-c", self.dir / "nginx.conf", "-p", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for port in (self.port, self.tls_port, self.mtls_port):
            if port:
                wait_port(port, self.proc)

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}/{path}"

    def tls_url(self, path=""):
        return f"https://127.0.0.1:{self.tls_port}/{path}"

    def mtls_url(self, path=""):
        return f"https://127.0.0.1:{self.mtls_port}/{path}"

    def mtls_requests(self):
        """(status, body bytes, client verification, client subject) of each mTLS request."""
        text = self.mtls_log.read_text() if self.mtls_log.exists() else ""
        return [(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4))
                for m in re.finditer(r"^GET \S+ (\d+) (\d+) \[(.*?)\] \[(.*?)\]$", text, re.M)]

    def bytes_sent(self, name):
        if not self.log.exists():
            return 0
        return sum(int(m.group(2)) for m in re.finditer(r"^GET (\S+) \d+ (\d+) \S+ \d+$", self.log.read_text(), re.M)
                   if m.group(1).endswith(name))

    def protocols(self, name):
        """The HTTP versions of the GETs for `name`, as nginx logged them."""
        return [m.group(2) for m in re.finditer(r"^GET (\S+) \d+ \d+ (\S+) \d+$", self.log.read_text(), re.M)
                if m.group(1).endswith(name)]

    def connections(self):
        """How many connections the logged requests came over."""
        return len(set(re.findall(r" (\d+)$", self.log.read_text(), re.M)))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Hostile(http.server.ThreadingHTTPServer):
    """An origin that serves `root` with Range support, and misbehaves on request."""

    def __init__(self, root, mode):
        self.root, self.mode, self.requests, self.seen = Path(root), mode, 0, set()
        self.auth_seen = []      # Authorization headers received
        self.callers = set()     # the addresses requests came from
        self.redirect_to = None  # base URL to redirect every request to
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), HostileHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/model"


class HostileHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.auth_seen.append(self.headers.get("Authorization"))
            srv.callers.add(self.client_address[0])
        if srv.mode == "folded" and self.path.startswith("/model/"):
            srv.redirect_to = f"http://127.0.0.1:{srv.server_address[1]}/cdn"
        if srv.mode == "folded" and self.path.startswith("/cdn/"):
            # The first header line continues nothing (obs-fold).
            self.wfile.write(b"HTTP/1.1 206 Partial Content\r\n\tX-Folded: nothing\r\nContent-Length: 0\r\n\r\n")
            return
        if srv.mode == "garbled-status":  # what libcurl alone reads as "HTTP/1.0 200"
            data = (srv.root / self.path.removeprefix("/model/")).read_bytes()
            self.wfile.write(b"HTTP/q.02 Found\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            return
        if srv.redirect_to:
            self.send_response(302)
            self.send_header("Location", srv.redirect_to + self.path.removeprefix("/model"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = srv.root / self.path.removeprefix("/model/")
        data = path.read_bytes()
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        b, e = (int(m.group(1)), int(m.group(2)) + 1) if m else (0, len(data))
        body = bytearray(data[b:e])
        if srv.mode == "flip":
            body[len(body) // 2] ^= 0x01
        elif srv.mode == "fail-first":
            with srv.lock:
                first = (self.path, b, e) not in srv.seen
                srv.seen.add((self.path, b, e))
            if first:  # every range fails once with 503, then succeeds
                self.send_response(503)
                self.end_headers()
                return
        elif srv.mode == "ignore-range":
            body = bytearray(data)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        elif srv.mode == "wrong-content-range":
            b, e = b + 1, e + 1
        elif srv.mode in ("stall", "truncate") and len(body) > 1000:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {b}-{e - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:500])
            self.wfile.flush()
            if srv.mode == "stall":
                time.sleep(3)
            return  # the connection closes with the body cut short
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {b}-{e - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def published(drun, drun_keys, tmp_path):
    """A signed model directory: (model path, signature path, public key)."""
    m = tmp_path / "model"
    (m / "tok").mkdir(parents=True)
    (m / "weights.bin").write_bytes(det_bytes(20 * PIECE + 123, 7))
    (m / "tok" / "vocab.json").write_bytes(b'{"a": 1}')
    (m / "config.json").write_bytes(b"{}")
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", PIECE, "--signature", tmp_path / "model.sig").ok()
    return m, tmp_path / "model.sig", pub


@pytest.fixture
def node_key(drun, tmp_path):
    drun("cache", "keygen", "--out", tmp_path / "node.key").ok()
    return f"file:{tmp_path / 'node.key'}"


@pytest.fixture
def nginx(tmp_path, published):
    srv = Nginx(tmp_path, published[0])
    yield srv
    srv.stop()


def fetch(drun, sig, pub, store, ks, *origins, extra=(), timeout=120):
    # Three attempts per piece keep failing cases quick; the retry logic is the same.
    args = ["fetch", "--signature", sig, "--public-key", pub, "--store", store, "--key-source", ks, "--attempts", 3]
    for o in origins:
        args += ["--origin", o]
    return drun(*args, *extra, timeout=timeout)


def stored_pieces(drun, store, ks):
    """How many pieces the store holds, by its own count (0 for a store never created)."""
    if not Path(store).exists():
        return 0
    return sum(a["stored_pieces"] for a in json.loads(drun("cache", "ls", "--store", store, "--key-source", ks,
                                                            "--json").ok().out))


def same_tree(a, b):
    files = lambda r: {p.relative_to(r): hashlib.sha256(p.read_bytes()).hexdigest() for p in r.rglob("*") if p.is_file()}
    return files(a) == files(b)


def test_fetch_from_nginx_then_export_bit_identical(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    r = fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.url(), extra=["--out", tmp_path / "out"]).ok()
    assert "23 pieces (0 already stored)" in r.out, r
    assert same_tree(m, tmp_path / "out")
    assert nginx.bytes_sent("weights.bin") == 20 * PIECE + 123
    # Connections stay open from piece to piece: no more than the fetch's 8 for its 26 requests.
    assert nginx.connections() <= 8, nginx.log.read_text()
    # A second run downloads nothing.
    r = fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.url()).ok()
    assert "0 pieces (23 already stored)" in r.out, r
    assert nginx.bytes_sent("weights.bin") == 20 * PIECE + 123


def test_bundle_by_url_over_https_with_a_test_ca(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    shutil.copy(sig, m / "model.sig")  # served next to the model, as a hub would
    r = fetch(drun, nginx.tls_url("model.sig"), pub, tmp_path / "store", node_key, nginx.tls_url(),
              extra=["--ca-cert", nginx.ca, "--out", tmp_path / "out"])
    r.ok()
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (m / "weights.bin").read_bytes()


def test_server_certificate_from_another_ca_is_refused(drun, tmp_path, published, nginx, node_key):
    _, sig, pub = published
    other_ca, _, _ = make_ca_and_server_cert(tmp_path / "other", "another CA")
    r = fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.tls_url(), extra=["--ca-cert", other_ca])
    r.fails(3, "certificate")
    # --insecure fetches, but warns; every piece is still verified against the signature.
    r = fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.tls_url(), extra=["--insecure"]).ok()
    assert "WARNING" in r.err and "NOT verified" in r.err


def test_tls12_only_origin_needs_an_explicit_step_down(drun, tmp_path, published, node_key):
    m, sig, pub = published
    srv = Nginx(tmp_path, m, tls_protocols="TLSv1.2")
    try:
        fetch(drun, sig, pub, tmp_path / "store", node_key, srv.tls_url(), extra=["--ca-cert", srv.ca]).fails(3)
        fetch(drun, sig, pub, tmp_path / "store", node_key, srv.tls_url(),
              extra=["--ca-cert", srv.ca, "--tls-min", "1.2"]).ok()
    finally:
        srv.stop()


@pytest.fixture
def mtls(tmp_path, published):
    """nginx demanding client certificates from the "origin clients" CA: (server, cert, key)."""
    clients, _, _ = make_ca_and_server_cert(tmp_path / "clients", "origin clients CA")
    cert, key = issue_client_cert(tmp_path / "clients", "node-7")
    srv = Nginx(tmp_path, published[0], client_ca=clients)
    yield srv, cert, key
    srv.stop()


def test_origin_demanding_a_client_certificate_gets_one(drun, tmp_path, published, mtls, node_key):
    m, sig, pub = published
    srv, cert, key = mtls
    shutil.copy(sig, m / "model.sig")
    ca = ["--ca-cert", srv.ca]
    # Without one: nginx answers 400 to every request, and nothing is stored.
    fetch(drun, sig, pub, tmp_path / "s0", node_key, srv.mtls_url(), extra=ca).fails(3, "400")
    assert srv.mtls_requests() and all(r[0] == 400 and r[2] == "NONE" for r in srv.mtls_requests())
    assert stored_pieces(drun, tmp_path / "s0", node_key) == 0
    # One from a CA the origin does not trust: refused the same way.
    other_cert, other_key = issue_client_cert(srv.dir / "pki", "stranger")
    fetch(drun, sig, pub, tmp_path / "s1", node_key, srv.mtls_url(),
          extra=[*ca, "--origin-cert", other_cert, "--origin-key", other_key]).fails(3, "400")
    assert all(r[0] == 400 for r in srv.mtls_requests())
    before = len(srv.mtls_requests())
    # The node's own: the bundle by URL and every piece come over mutual TLS.
    fetch(drun, srv.mtls_url("model.sig"), pub, tmp_path / "s2", node_key, srv.mtls_url(),
          extra=[*ca, "--origin-cert", cert, "--origin-key", key, "--out", tmp_path / "out"]).ok()
    assert stored_pieces(drun, tmp_path / "s2", node_key) == 23
    (m / "model.sig").unlink()  # served beside the model, not part of it
    assert same_tree(m, tmp_path / "out")
    served = srv.mtls_requests()[before:]
    assert served and all(r[0] in (200, 206) and r[2] == "SUCCESS" and r[3] == "CN=node-7" for r in served), served
    assert sum(r[1] for r in served if r[0] == 206) >= 20 * PIECE


def test_origin_client_certificate_that_cannot_serve_is_refused_before_any_request(drun, tmp_path, published, mtls,
                                                                                  node_key):
    _, sig, pub = published
    srv, cert, key = mtls
    other_cert, other_key = issue_client_cert(srv.dir / "pki", "other")
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(key).read_bytes())
    os.chmod(loose, 0o644)
    sealed = tmp_path / "encrypted.key"
    openssl("pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", sealed)
    os.chmod(sealed, 0o600)
    cases = [(["--origin-cert", cert, "--origin-key", other_key], "does not match the certificate"),
             (["--origin-cert", cert, "--origin-key", loose], "permissions 0644"),
             (["--origin-cert", cert, "--origin-key", sealed], "unencrypted"),
             (["--origin-cert", tmp_path / "absent.pem", "--origin-key", key], "certificate chain"),
             (["--origin-cert", cert], "together")]
    for extra, why in cases:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.mtls_url(), extra=["--ca-cert", srv.ca, *extra])
        r.fails(2, why)
    assert srv.mtls_requests() == []
    assert stored_pieces(drun, tmp_path / "store", node_key) == 0


def test_fetch_dials_origins_from_the_local_address_it_is_given(drun, tmp_path, published, node_key):
    m, sig, pub = published
    srv = Hostile(m, "honest")
    try:
        fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), extra=["--local-address", "127.0.0.8"]).ok()
        assert srv.callers == {"127.0.0.8"}
        fetch(drun, sig, pub, tmp_path / "s2", node_key, srv.url(),
              extra=["--local-address", "127.0.0.300"]).fails(2, "not an IP address")
        fetch(drun, sig, pub, tmp_path / "s3", node_key, srv.url(),
              extra=["--local-address", "192.0.2.1"]).fails(3, "cannot dial from 192.0.2.1")
        assert srv.callers == {"127.0.0.8"}
    finally:
        srv.shutdown()


def test_untrusted_bundle_downloads_nothing(drun, drun_keys, tmp_path, published, nginx, node_key):
    _, sig, _ = published
    other = drun_keys["ecdsa-p384"][1]
    fetch(drun, sig, other, tmp_path / "store", node_key, nginx.url()).fails(1, "hint")
    assert nginx.bytes_sent("weights.bin") == 0


@pytest.mark.parametrize("mode", ["flip", "ignore-range", "wrong-content-range"])
def test_hostile_origin_alone_fails_and_stores_nothing_unverified(drun, tmp_path, published, node_key, mode):
    m, sig, pub = published
    srv = Hostile(m, mode)
    try:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), extra=["--out", tmp_path / "out"])
        r.fails(1 if mode == "flip" else 3, "piece", "failed from every source")
        assert not (tmp_path / "out").exists()
        # What little may have been stored verifies (only config.json and vocab.json are single
        # pieces that a misbehaving Range handling cannot corrupt).
        drun("cache", "verify", "--store", tmp_path / "store", "--key-source", node_key).ok()
    finally:
        srv.shutdown()


@pytest.mark.parametrize("mode,why", [("folded", "header line that does not parse"),
                                      ("garbled-status", 'status line does not parse: "HTTP/q.02 Found')])
def test_answers_that_do_not_parse_are_refused_cleanly(drun, tmp_path, published, node_key, mode, why):
    # Both found by tests/fuzz/origin_http.cpp. folded: a first header line that continues nothing,
    # after a redirect; libcurl 7.88 kept a pointer to the previous answer's last header and
    # unfolded the line into freed memory when the handle was reused (the ASan build of this test
    # caught it): drun gives every transfer a fresh handle. garbled-status: libcurl reads a status
    # line that starts with "HTTP/" and does not parse as a 200; drun refuses it.
    m, sig, pub = published
    srv = Hostile(m, mode)
    try:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), extra=["--connections", 1])
        r.fails(3, why, "failed from every source")
    finally:
        srv.shutdown()


def test_bad_origin_is_charged_and_the_good_one_completes(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    srv = Hostile(m, "flip")
    try:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), nginx.url(),
                  extra=["--out", tmp_path / "out"]).ok()
        line = next(l for l in r.out.splitlines() if srv.url() in l)
        assert re.search(r"0 pieces, [1-9]\d* rejected", line), r
        assert same_tree(m, tmp_path / "out")
    finally:
        srv.shutdown()


def test_flaky_origin_recovers_with_retries(drun, tmp_path, published, node_key):
    m, sig, pub = published
    srv = Hostile(m, "fail-first")
    try:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), extra=["--out", tmp_path / "out"]).ok()
        assert re.search(r"23 pieces, 0 rejected, 23 errors", r.out), r
        assert same_tree(m, tmp_path / "out")
    finally:
        srv.shutdown()


def test_killed_fetch_resumes_with_only_missing_pieces(drun, drun_bin, tmp_path, drun_keys, node_key):
    m = tmp_path / "big"
    m.mkdir()
    (m / "w.bin").write_bytes(det_bytes(64 << 20, 3))
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", 1 << 20, "--signature", tmp_path / "big.sig").ok()
    srv = Nginx(tmp_path, m)
    try:
        argv = [drun_bin, "fetch", "--signature", tmp_path / "big.sig", "--public-key", pub, "--store",
                tmp_path / "store", "--key-source", node_key, "--origin", srv.url(), "--connections", "2"]
        p = subprocess.Popen(list(map(str, argv)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        p.kill()
        p.wait()
        time.sleep(1)  # nginx logs the killed transfers when it notices the closed connections
        first = srv.bytes_sent("w.bin")
        r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        already = int(re.search(r"\((\d+) already stored\)", r.stdout).group(1))
        second = srv.bytes_sent("w.bin") - first
        # The rerun asked only for the pieces that were not stored.
        assert second == (64 - already) << 20, (first, second, already)
    finally:
        srv.stop()


def test_fetch_out_writes_pieces_as_they_verify_and_nothing_unfinished_reaches_a_final_path(
        drun, drun_bin, tmp_path, drun_keys, node_key):
    """--out writes each verified piece into a staging directory inside the destination as it
    arrives; a killed fetch leaves nothing at a final path, and the rerun (which takes the stored
    pieces from the store and the rest from the origin) ends with the files in place."""
    m = tmp_path / "big"
    (m / "sub").mkdir(parents=True)
    (m / "w.bin").write_bytes(det_bytes(48 << 20, 5))
    (m / "sub" / "small.txt").write_bytes(b"small")
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", 1 << 20, "--signature", tmp_path / "big.sig").ok()
    srv = Nginx(tmp_path, m)
    out = tmp_path / "out" / "model"
    try:
        argv = [drun_bin, "fetch", "--signature", tmp_path / "big.sig", "--public-key", pub, "--store",
                tmp_path / "store", "--key-source", node_key, "--origin", srv.url(), "--connections", "2",
                "--limit-rate", str(24 << 20), "--out", out]
        p = subprocess.Popen(list(map(str, argv)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.8)
        staging = list(out.glob(".drun-export-*")) if out.exists() else []
        assert staging and not (out / "w.bin").exists(), list(out.iterdir()) if out.exists() else "no out"
        assert (staging[0] / "w.bin").stat().st_size > 0  # pieces were being written as they arrived
        p.kill()
        p.wait()
        assert [x.name for x in out.iterdir()] == [staging[0].name]  # nothing at a final path
        r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(re.search(r"\((\d+) already stored\)", r.stdout).group(1)) > 0
    finally:
        srv.stop()
    assert same_tree(m, out)
    assert sorted(x.name for x in out.iterdir()) == ["sub", "w.bin"]  # the stale staging directory is gone
    # A destination that is not empty is refused before anything is fetched; a failed fetch
    # leaves no directory it made.
    drun("fetch", "--signature", tmp_path / "big.sig", "--public-key", pub, "--store", tmp_path / "s2",
         "--key-source", node_key, "--origin", "http://127.0.0.1:1/", "--out", out).fails(2, "not an empty directory")
    drun("fetch", "--signature", tmp_path / "big.sig", "--public-key", pub, "--store", tmp_path / "s3",
         "--key-source", node_key, "--origin", "http://127.0.0.1:1/", "--attempts", "1",
         "--out", tmp_path / "new" / "dir").fails(3)
    assert not (tmp_path / "new").exists()
    # "dir/" is "dir": created 0700 like any owner-only export.
    drun("fetch", "--signature", tmp_path / "big.sig", "--public-key", pub, "--store", tmp_path / "store",
         "--key-source", node_key, "--origin", "http://127.0.0.1:1/", "--out", f"{tmp_path / 'slash'}/").ok()
    assert (tmp_path / "slash").stat().st_mode & 0o777 == 0o700


def test_credentials_go_to_the_origin_only_never_across_a_redirect(drun, tmp_path, published, node_key):
    m, sig, pub = published
    cdn = Hostile(m, "plain")
    hub = Hostile(m, "plain")
    hub.redirect_to = cdn.url()  # another port: another origin
    (tmp_path / "headers").write_text("Authorization: Bearer s3cr3t-token\n")
    os.chmod(tmp_path / "headers", 0o600)
    try:
        # The bundle too comes from the hub (through the same redirect), with the same credentials.
        shutil.copy(sig, m / "model.sig")
        # One connection, so that "once per file" is exact (parallel first requests race the cache).
        r = fetch(drun, hub.url() + "/model.sig", pub, tmp_path / "store", node_key, hub.url(),
                  extra=["--header-file", tmp_path / "headers", "--out", tmp_path / "out", "--connections", 1]).ok()
        (m / "model.sig").unlink()
        assert same_tree(m, tmp_path / "out")
        assert "s3cr3t" not in r.out + r.err
        assert hub.auth_seen and all(a == "Bearer s3cr3t-token" for a in hub.auth_seen)
        assert cdn.auth_seen and all(a is None for a in cdn.auth_seen), cdn.auth_seen
        # The redirect target is reused: the hub is asked once per file (3), not once per piece
        # (23), plus once for the bundle.
        assert len(hub.auth_seen) == 4, len(hub.auth_seen)
        # A header file others can read is refused.
        os.chmod(tmp_path / "headers", 0o644)
        fetch(drun, sig, pub, tmp_path / "store2", node_key, hub.url(),
              extra=["--header-file", tmp_path / "headers"]).fails(2, "permissions")
    finally:
        hub.shutdown()
        cdn.shutdown()


def test_credentials_are_scoped_to_the_origin_they_were_given_for(drun, tmp_path, published, node_key, monkeypatch):
    """Security review, finding 7: a bearer token went to every --origin and to the --signature
    URL's host. Now it goes to the first origin (or --credentials-origin) only."""
    m, sig, pub = published
    hub, mirror, bundles = Hostile(m, "plain"), Hostile(m, "plain"), Hostile(m, "plain")
    monkeypatch.setenv("HUB_TOKEN", "s3cr3t-token")
    shutil.copy(sig, m / "model.sig")
    try:
        r = fetch(drun, bundles.url() + "/model.sig", pub, tmp_path / "s1", node_key, hub.url(), mirror.url(),
                  extra=["--bearer-env", "HUB_TOKEN", "--out", tmp_path / "out"]).ok()
        assert (tmp_path / "out/weights.bin").read_bytes() == (m / "weights.bin").read_bytes()
        assert hub.auth_seen and all(a == "Bearer s3cr3t-token" for a in hub.auth_seen), hub.auth_seen
        assert mirror.auth_seen and all(a is None for a in mirror.auth_seen), mirror.auth_seen
        assert bundles.auth_seen == [None], bundles.auth_seen
        # Named explicitly: the mirror gets them, the hub does not.
        for s in (hub, mirror, bundles):
            s.auth_seen.clear()
        fetch(drun, bundles.url() + "/model.sig", pub, tmp_path / "s2", node_key, hub.url(), mirror.url(),
              extra=["--bearer-env", "HUB_TOKEN", "--credentials-origin", mirror.url()]).ok()
        assert all(a is None for a in hub.auth_seen + bundles.auth_seen), (hub.auth_seen, bundles.auth_seen)
        assert mirror.auth_seen and all(a == "Bearer s3cr3t-token" for a in mirror.auth_seen), mirror.auth_seen
        # Credentials with nowhere to go, or a scope without credentials, are usage errors.
        fetch(drun, sig, pub, tmp_path / "s3", node_key, "s3://bucket/m",
              extra=["--credentials-origin", hub.url()]).fails(2, "--credentials-origin")
    finally:
        (m / "model.sig").unlink()
        for s in (hub, mirror, bundles):
            s.shutdown()


def test_credentials_for_the_bundle_host_and_scopes_that_name_nothing(drun, tmp_path, published, node_key,
                                                                       monkeypatch):
    """--credentials-origin may name the --signature URL's origin: then the bundle host alone gets
    them, no --origin does. A scope that is the origin of no URL of the fetch (a typo would send
    the token nowhere, or somewhere unmeant later) and credentials whose default origin is not
    http(s) are usage errors, before anything is sent."""
    m, sig, pub = published
    hub, bundles = Hostile(m, "plain"), Hostile(m, "plain")
    monkeypatch.setenv("BUNDLE_TOKEN", "s3cr3t-token")
    shutil.copy(sig, m / "model.sig")
    try:
        fetch(drun, bundles.url() + "/model.sig", pub, tmp_path / "s1", node_key, hub.url(),
              extra=["--bearer-env", "BUNDLE_TOKEN", "--credentials-origin", bundles.url() + "/elsewhere"]).ok()
        assert bundles.auth_seen == ["Bearer s3cr3t-token"], bundles.auth_seen
        assert hub.auth_seen and all(a is None for a in hub.auth_seen), hub.auth_seen
        hub.auth_seen.clear()
        bundles.auth_seen.clear()
        fetch(drun, bundles.url() + "/model.sig", pub, tmp_path / "s2", node_key, hub.url(),
              extra=["--bearer-env", "BUNDLE_TOKEN", "--credentials-origin", "http://127.0.0.1:1/"]).fails(
            2, "--credentials-origin http://127.0.0.1:1 is the origin of no --origin or --signature url")
        fetch(drun, sig, pub, tmp_path / "s3", node_key, "s3://bucket/m", hub.url(),
              extra=["--bearer-env", "BUNDLE_TOKEN"]).fails(2, "for one http(s) origin", "s3://bucket/m is not one",
                                                            "--credentials-origin")
        assert hub.auth_seen == [] and bundles.auth_seen == []
    finally:
        (m / "model.sig").unlink()
        hub.shutdown()
        bundles.shutdown()


@pytest.mark.parametrize("mode", ["stall", "truncate"])
def test_stalled_or_truncated_transfers_are_retried_elsewhere(drun, tmp_path, published, nginx, node_key, mode):
    m, sig, pub = published
    srv = Hostile(m, mode)
    try:
        r = fetch(drun, sig, pub, tmp_path / "store", node_key, srv.url(), nginx.url(),
                  extra=["--stall-timeout", 1, "--out", tmp_path / "out"]).ok()
        assert same_tree(m, tmp_path / "out")
        line = next(l for l in r.out.splitlines() if srv.url() in l)
        assert re.search(r"[1-9]\d* errors", line), r
    finally:
        srv.shutdown()


def test_through_a_forward_proxy(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    tinyproxy = shutil.which("tinyproxy")
    if not tinyproxy:
        pytest.skip("tinyproxy is not installed (scripts/bootstrap.sh installs it)")
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    (tmp_path / "tinyproxy.conf").write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nLogFile \"{log}\"\nLogLevel Connect\n"
        f"PidFile \"{tmp_path / 'tinyproxy.pid'}\"\nMaxClients 50\n")
    proc = subprocess.Popen([tinyproxy, "-d", "-c", tmp_path / "tinyproxy.conf"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.url(),
              extra=["--proxy", f"http://127.0.0.1:{port}", "--out", tmp_path / "out"]).ok()
        assert same_tree(m, tmp_path / "out")
        assert "weights.bin" in log.read_text()  # the requests went through the proxy
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http11_even_where_the_origin_offers_http2(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    fetch(drun, sig, pub, tmp_path / "store", node_key, nginx.tls_url(), extra=["--ca-cert", nginx.ca]).ok()
    # nginx offers h2 over TLS (ALPN); drun's pieces, each on a connection of its own, take
    # HTTP/1.1, which moves them faster (src/fetch/http.cpp says by how much).
    assert set(nginx.protocols("weights.bin")) == {"HTTP/1.1"}, nginx.protocols("weights.bin")
    fetch(drun, sig, pub, tmp_path / "store2", node_key, nginx.url()).ok()
    assert "HTTP/1.1" in nginx.protocols("weights.bin")  # cleartext stays on HTTP/1.1


class Tinyproxy:
    def __init__(self, tmp, auth=None):
        exe = shutil.which("tinyproxy")
        if not exe:
            pytest.skip("tinyproxy is not installed (scripts/bootstrap.sh installs it)")
        self.port = free_port()
        self.log = tmp / "tinyproxy.log"
        conf = (f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nLogFile \"{self.log}\"\n"
                f"LogLevel Connect\nPidFile \"{tmp / 'tinyproxy.pid'}\"\nMaxClients 50\n")
        if auth:
            conf += f"BasicAuth {auth[0]} {auth[1]}\n"
        (tmp / "tinyproxy.conf").write_text(conf)
        self.proc = subprocess.Popen([exe, "-d", "-c", tmp / "tinyproxy.conf"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def requests_for(self, name):
        return self.log.read_text().count(name) if self.log.exists() else 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class TlsFront:
    """A TLS listener relaying every connection to a plaintext port: an HTTPS proxy made of
    tinyproxy and this, with a certificate from `pki` (ca.pem, server.pem, server.key)."""

    def __init__(self, backend_port, cert, key):
        import ssl
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.backend = backend_port
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.relay, args=(conn,), daemon=True).start()

    def relay(self, conn):
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        back = socket.create_connection(("127.0.0.1", self.backend))

        def pump(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(back, tls), daemon=True).start()
        pump(tls, back)

    def stop(self):
        self.sock.close()


def test_proxy_credentials_from_a_file_or_the_environment(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    proxy = Tinyproxy(tmp_path, auth=("drun", "pr0xy-pa55"))
    url = f"http://127.0.0.1:{proxy.port}"
    try:
        fetch(drun, sig, pub, tmp_path / "s1", node_key, nginx.url(), extra=["--proxy", url]).fails(3, "HTTP 407")
        creds = tmp_path / "proxy-auth"
        creds.write_text("drun:pr0xy-pa55\n")
        os.chmod(creds, 0o600)
        r = fetch(drun, sig, pub, tmp_path / "s2", node_key, nginx.url(),
                  extra=["--proxy", url, "--proxy-auth-file", creds, "--out", tmp_path / "out"]).ok()
        assert same_tree(m, tmp_path / "out")
        assert "pr0xy" not in r.out + r.err
        assert proxy.requests_for("weights.bin") > 0
        # The same from an environment variable.
        os.environ["DRUN_TEST_PROXY_AUTH"] = "drun:pr0xy-pa55"
        try:
            fetch(drun, sig, pub, tmp_path / "s3", node_key, nginx.url(),
                  extra=["--proxy", url, "--proxy-auth-env", "DRUN_TEST_PROXY_AUTH"]).ok()
        finally:
            del os.environ["DRUN_TEST_PROXY_AUTH"]
        # Credentials on the command line, or in a file others can read, are refused.
        fetch(drun, sig, pub, tmp_path / "s4", node_key, nginx.url(),
              extra=["--proxy", f"http://drun:pr0xy-pa55@127.0.0.1:{proxy.port}"]).fails(2, "--proxy-auth-file")
        os.chmod(creds, 0o644)
        fetch(drun, sig, pub, tmp_path / "s5", node_key, nginx.url(),
              extra=["--proxy", url, "--proxy-auth-file", creds]).fails(2, "permissions")
    finally:
        proxy.stop()


def test_https_proxy_is_verified_like_an_origin(drun, tmp_path, published, nginx, node_key):
    m, sig, pub = published
    proxy = Tinyproxy(tmp_path)
    ca, cert, key = make_ca_and_server_cert(tmp_path / "proxy-pki", "proxy CA")
    front = TlsFront(proxy.port, cert, key)
    url = f"https://127.0.0.1:{front.port}"
    try:
        # The proxy's certificate does not chain to a CA we were given: nothing goes through it.
        fetch(drun, sig, pub, tmp_path / "s1", node_key, nginx.url(), extra=["--proxy", url]).fails(3)
        assert proxy.requests_for("weights.bin") == 0
        # An HTTPS origin through an HTTPS proxy: TLS to the proxy, then TLS inside the tunnel.
        bundle = tmp_path / "both-cas.pem"
        bundle.write_bytes(Path(ca).read_bytes() + Path(nginx.ca).read_bytes())
        fetch(drun, sig, pub, tmp_path / "s2", node_key, nginx.tls_url(),
              extra=["--proxy", url, "--ca-cert", bundle, "--out", tmp_path / "out"]).ok()
        assert same_tree(m, tmp_path / "out")
        assert f"CONNECT 127.0.0.1:{nginx.tls_port}" in proxy.log.read_text()  # tunnelled through it
    finally:
        front.stop()
        proxy.stop()


def slow_model(drun, tmp_path, drun_keys, size=8 << 20):
    m = tmp_path / "slow"
    m.mkdir()
    (m / "w.bin").write_bytes(det_bytes(size, 9))
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", 1 << 20, "--signature", tmp_path / "slow.sig").ok()
    return m, tmp_path / "slow.sig", pub


def test_ctrl_c_cancels_cleanly_and_a_rerun_fetches_only_the_rest(drun, drun_bin, tmp_path, drun_keys, node_key):
    m, sig, pub = slow_model(drun, tmp_path, drun_keys)
    srv = Nginx(tmp_path, m)
    try:
        argv = [drun_bin, "fetch", "--signature", sig, "--public-key", pub, "--store", tmp_path / "store",
                "--key-source", node_key, "--origin", srv.url(), "--connections", "2"]
        p = subprocess.Popen(list(map(str, argv + ["--limit-rate", "2M"])), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        assert time.time() - t0 < 2, "cancellation took too long"
        assert p.returncode == 130, (p.returncode, out, err)
        assert "cancelled" in err and "run it again" in err, err
        drun("cache", "verify", "--store", tmp_path / "store", "--key-source", node_key).ok()
        time.sleep(0.5)
        first = srv.bytes_sent("w.bin")
        r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        already = int(re.search(r"\((\d+) already stored\)", r.stdout).group(1))
        assert 0 < already < 8, r.stdout
        assert srv.bytes_sent("w.bin") - first == (8 - already) << 20
    finally:
        srv.stop()


def test_progress_bar_on_a_terminal_counts_pieces_and_time_left(drun_bin, drun, tmp_path, drun_keys, node_key):
    import pty
    m, sig, pub = slow_model(drun, tmp_path, drun_keys, size=4 << 20)
    srv = Nginx(tmp_path, m)
    master, slave = pty.openpty()
    try:
        argv = [drun_bin, "fetch", "--signature", sig, "--public-key", pub, "--store", tmp_path / "store",
                "--key-source", node_key, "--origin", srv.url(), "--limit-rate", "2M"]
        p = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=slave,
                             env={**os.environ, "DRUN_PROGRESS_DELAY_MS": "0"})
        os.close(slave)
        slave = None
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the pty closes when drun exits
                break
            if not chunk:
                break
            seen += chunk
        assert p.wait(timeout=30) == 0
        text = seen.decode(errors="replace")
        assert re.search(r"fetching: +\d+%  \d+ / 4 MiB  \d+ MiB/s  \d/4 pieces  \d+:\d\d left", text), text
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
        srv.stop()


def test_rate_limit(drun, tmp_path, drun_keys, node_key):
    m = tmp_path / "m"
    m.mkdir()
    (m / "w.bin").write_bytes(det_bytes(2 << 20, 5))
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", PIECE, "--signature", tmp_path / "m.sig").ok()
    srv = Nginx(tmp_path, m)
    try:
        t0 = time.time()
        fetch(drun, tmp_path / "m.sig", pub, tmp_path / "store", node_key, srv.url(),
              extra=["--limit-rate", 1 << 20]).ok()
        assert time.time() - t0 > 1.5  # 2 MiB at 1 MiB/s
    finally:
        srv.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "AKIDDRUNTEST", "AWS_SECRET_ACCESS_KEY": "drun-test-secret", "AWS_REGION": "us-east-1"}


def python_with_moto():
    """The machine's other Python (on PATH) ships moto and boto3; Debian's does not."""
    for candidate in (shutil.which("python3"), "/usr/local/bin/python3"):
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        if subprocess.run([candidate, "-c", "import moto.server, boto3"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_s3_requests_are_signed_with_sigv4(drun, tmp_path, published, node_key, monkeypatch):
    m, sig, pub = published
    srv = Hostile(m, "plain")
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    try:
        port = srv.server_address[1]
        fetch(drun, sig, pub, tmp_path / "store", node_key, "s3://bucket/model",
              extra=["--s3-endpoint", f"http://127.0.0.1:{port}"])  # the bucket path is not served: fails
        assert srv.auth_seen and all(a and a.startswith("AWS4-HMAC-SHA256 Credential=AKIDDRUNTEST/") for a in srv.auth_seen)
        assert "drun-test-secret" not in " ".join(srv.auth_seen)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        fetch(drun, sig, pub, tmp_path / "store", node_key, "s3://bucket/model",
              extra=["--s3-endpoint", f"http://127.0.0.1:{port}"]).fails(2, "AWS_SECRET_ACCESS_KEY")
    finally:
        srv.shutdown()


def test_fetch_from_an_s3_endpoint(drun, tmp_path, published, node_key, monkeypatch):
    m, sig, pub = published
    py = python_with_moto()
    if not py:
        pytest.skip("no Python with moto and boto3 on this machine for an S3 endpoint")
    port = free_port()
    env = dict(os.environ, **S3_ENV)
    proc = subprocess.Popen([py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout=30)
        upload = (
            "import boto3, os, sys, pathlib\n"
            f"s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', region_name='us-east-1')\n"
            "s3.create_bucket(Bucket='models')\n"
            "root = pathlib.Path(sys.argv[1])\n"
            "for p in root.rglob('*'):\n"
            "    if p.is_file(): s3.upload_file(str(p), 'models', 'org/model/' + p.relative_to(root).as_posix())\n")
        subprocess.run([py, "-c", upload, str(m)], env=env, check=True, capture_output=True, timeout=60)
        for k, v in S3_ENV.items():
            monkeypatch.setenv(k, v)
        fetch(drun, sig, pub, tmp_path / "store", node_key, "s3://models/org/model",
              extra=["--s3-endpoint", f"http://127.0.0.1:{port}", "--out", tmp_path / "out"]).ok()
        assert same_tree(m, tmp_path / "out")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
