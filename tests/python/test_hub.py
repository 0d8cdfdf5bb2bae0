"""hf://ORG/NAME[@REVISION]: a Hugging Face-style hub by name, against a hub written here that
answers resolve/ URLs with 302s to a CDN on another origin (as the real hub does), demands a
token for a private repository, and records every request's headers on both sides."""

import http.server
import re
import threading
from pathlib import Path

import pytest

from test_fetch import node_key, same_tree, stored_pieces  # noqa: F401
from test_registry import signed  # noqa: F401 (a fixture)

TOKEN = "hf_test_token_abcdef"


class Hub:
    """The hub on 127.0.0.1 and its CDN on localhost (another origin), both plain HTTP."""

    def __init__(self, repos, private=()):
        self.hub_requests, self.cdn_requests = [], []
        hub = self

        class CDN(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.cdn_requests.append((self.path, dict(self.headers)))
                parts = Path(self.path.split("?")[0].lstrip("/")).parts
                repo, rev, rel = "/".join(parts[:2]), parts[2], "/".join(parts[3:])
                f = repos.get((repo, rev))
                f = f / rel if f else None
                if not f or not f.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = f.read_bytes()
                m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if m:
                    a, b = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                    data = data[a:b + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Resolve(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.hub_requests.append((self.path, dict(self.headers)))
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
                if not m or (m.group(1), m.group(2)) not in repos:
                    code = 404
                elif m.group(1) in private and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    code = 401
                else:
                    code = 302
                self.send_response(code)
                if code == 302:
                    self.send_header("Location", f"http://localhost:{hub.cdn_port}/{m.group(1)}/{m.group(2)}/"
                                                 f"{m.group(3)}?sig=presigned")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.cdn = http.server.ThreadingHTTPServer(("localhost", 0), CDN)
        self.cdn_port = self.cdn.server_address[1]
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Resolve)
        self.endpoint = f"http://127.0.0.1:{self.srv.server_address[1]}"
        for s in (self.cdn, self.srv):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.cdn.shutdown()


def hub_fetch(drun, ref, pub, store, ks, out=None, signature=None):
    args = ["fetch", "--signature", signature or ref + "/model.sig", "--public-key", pub, "--origin", ref,
            "--store", store, "--key-source", ks, "--attempts", 3]
    return drun(*args, *(["--out", out] if out else []), timeout=120)


def test_a_private_model_by_name_with_the_token_for_the_hub_only(drun, tmp_path, signed, node_key, monkeypatch):
    m, sig, pub = signed
    hub = Hub({("acme/llm", "main"): m, ("acme/llm", "v2"): m}, private={"acme/llm"})
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HOME", str(tmp_path))  # no token file of the machine's user
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        # Without the token the private repository is refused (the bundle first: nothing fetched).
        hub_fetch(drun, "hf://acme/llm", pub, tmp_path / "s0", node_key).fails(4, "401")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        hub.hub_requests.clear()
        out = tmp_path / "out"
        hub_fetch(drun, "hf://acme/llm", pub, tmp_path / "store", node_key, out=out).ok()
        (out / "model.sig").write_bytes(sig.read_bytes())
        assert same_tree(m, out)
        assert any("/resolve/main/weights.bin" in p for p, _ in hub.hub_requests)
        assert all(h.get("Authorization") == f"Bearer {TOKEN}" for _, h in hub.hub_requests)
        # The CDN got the ranges, never the token.
        assert hub.cdn_requests and not any("Authorization" in h for _, h in hub.cdn_requests)
        # A revision by name; a token from the token file instead of the environment.
        monkeypatch.delenv("HF_TOKEN")
        token_file = tmp_path / "hf-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
        hub.hub_requests.clear()
        hub_fetch(drun, "hf://acme/llm@v2", pub, tmp_path / "store2", node_key).ok()
        assert hub.hub_requests and all("/resolve/v2/" in p for p, _ in hub.hub_requests)
        token_file.chmod(0o644)
        hub_fetch(drun, "hf://acme/llm@v2", pub, tmp_path / "store3", node_key).fails(2, "readable by its owner only")
        # A revision the hub does not have: not found (exit 3).
        token_file.chmod(0o600)
        hub_fetch(drun, "hf://acme/llm@nope", pub, tmp_path / "s4", node_key).fails(3, "404")
    finally:
        hub.stop()


def test_bad_hub_references_are_named(drun, tmp_path, signed, node_key):
    m, sig, pub = signed
    for ref, why in (("hf://acme", "no ORG/NAME"), ("hf://acme/../x", "ORG and NAME"),
                     ("hf://acme/llm@bad rev", "revision"), ("hf://acme/llm/model.sig", "not a file")):
        drun("fetch", "--signature", sig, "--public-key", pub, "--origin", ref, "--store", tmp_path / "s",
             "--key-source", node_key).fails(2, why)
    drun("fetch", "--signature", "hf://acme/llm", "--public-key", pub, "--origin", "hf://acme/llm",
         "--store", tmp_path / "s", "--key-source", node_key).fails(2, "names no file")
