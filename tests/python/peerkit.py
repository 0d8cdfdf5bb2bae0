"""Shared pieces for the peer tests: a test PKI made with openssl (a CA, node certificates with
IP, DNS and SPIFFE URI SANs), a seeded store, and `drun serve` processes on loopback."""

import os
import re
import socket
import subprocess
import time
from pathlib import Path

from conftest import det_bytes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


class PKI:
    """A CA in `d` and certificates it issues; keys are 0600 as drun requires."""

    def __init__(self, d, name="drun peers CA"):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca = self.dir / "ca.key", self.dir / "ca.pem"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", f"/CN={name}", "-keyout", self.ca_key, "-out", self.ca)

    def issue(self, name, cn=None, uri=None, ip="127.0.0.1", dns="localhost", days=2):
        """A certificate for `name`: (cert path, key path)."""
        key, csr, cert = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.pem"
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj",
                f"/O=drun tests/CN={cn or name}", "-keyout", key, "-out", csr)
        sans = [f"IP:{ip}"] if ip else []
        if dns:
            sans.append(f"DNS:{dns}")
        if uri:
            sans.append(f"URI:{uri}")
        ext = self.dir / f"{name}.cnf"
        ext.write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key, "-CAcreateserial", "-days", days,
                "-extfile", ext, "-out", cert)
        os.chmod(key, 0o600)
        return cert, key


class Serve:
    """`drun serve` in its own process, on a free loopback port."""

    def __init__(self, drun_bin, store, key_source, cert, key, client_ca, extra=(), env=None, log=None):
        """log: a file for the server's stderr, for long runs whose warnings would fill a pipe
        nobody reads until stop()."""
        self.port = free_port()
        self.argv = [drun_bin, "serve", "--store", store, "--key-source", key_source, "--listen",
                     f"127.0.0.1:{self.port}", "--tls-cert", cert, "--tls-key", key]
        if client_ca:
            self.argv += ["--client-ca", client_ca]
        self.argv += list(extra)
        self.log = open(log, "w") if log else None
        self.proc = subprocess.Popen(list(map(str, self.argv)), stdout=subprocess.PIPE,
                                     stderr=self.log or subprocess.PIPE, text=True, env=env)
        self.addr = f"127.0.0.1:{self.port}"
        end = time.time() + 10
        while time.time() < end:
            if self.proc.poll() is not None:
                why = self.proc.stderr.read() if self.proc.stderr else Path(log).read_text()
                raise RuntimeError(f"drun serve exited with {self.proc.returncode}: {why}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("drun serve did not listen")

    def stop(self):
        """Stops the server (SIGTERM) and returns its final statistics as a dict."""
        if self.proc.poll() is None:
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=20)
        if self.log:
            self.log.close()
            err = Path(self.log.name).read_text()
        self.out, self.err = out, err
        m = re.search(r"stopped: (\d+) connections, (\d+) requests, (\d+) pieces \(([\d.]+) MiB\) served, (\d+) denied, "
                      r"(\d+) handshakes refused, (\d+) protocol errors, (\d+) busy", out)
        if not m:
            return {}
        keys = ["connections", "requests", "pieces", "mib", "denied", "handshakes_refused", "protocol_errors", "busy"]
        return {k: float(v) if k == "mib" else int(v) for k, v in zip(keys, m.groups())}

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def signed_model(drun, root, key, size=3 << 20, piece=1 << 20, seed=11):
    """A model directory with one multi-piece file and a small one, signed: (dir, sig, artifact id)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(det_bytes(size, seed))
    (root / "config.json").write_bytes(b'{"layers": 2}')
    sig = root.parent / (root.name + ".sig")
    drun("sign", root, "--key", key, "--piece-size", piece, "--signature", sig).ok()
    man = drun("manifest", sig).ok()
    artifact = re.search(r"\b([0-9a-f]{64})\b", man.out).group(1)
    return root, sig, artifact


def seeded_store(drun, store, key_source, model, sig, pub):
    drun("cache", "import", model, "--signature", sig, "--public-key", pub, "--store", store,
         "--key-source", key_source).ok()
