"""The peer protocol spoken by hand (docs/peer-protocol.md): a raw TLS 1.3 client (standard
library only) for tests that attack a `drun serve` from outside, and /proc introspection of the
server process, and a lying peer (frames correctly, flips a byte of every piece), which also runs
as a process of its own: `python3 peerwire.py liar ...` (netswarm.py puts one in a network
namespace). Used by test_peer_protocol.py, test_peers.py, soak.py and netswarm.py."""

import argparse
import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

MiB = 1 << 20

# frame types
HELLO, GET_BUNDLE, GET_HAVE, GET_PIECE, RDMA_SETUP = 0x01, 0x02, 0x03, 0x04, 0x05
WELCOME, BODY, DATA, ERROR, RDMA_READY = 0x81, 0x82, 0x83, 0x84, 0x85
# error codes
BAD_REQUEST, UNSUPPORTED_VERSION, UNAUTHENTICATED, DENIED, NOT_FOUND, BUSY, INTERNAL, RDMA_UNAVAILABLE = range(1, 9)

# what the client accepts from a server (the protocol's bounds; a bundle is well under 16 MiB here)
MAX_ANSWER = 64 * MiB + 16 * MiB
MAX_BODY = {WELCOME: 4, BODY: 8, DATA: MiB, ERROR: 2 + 1024, RDMA_READY: 148}

# the readiness probe of peerkit.Serve: one bare TCP connection, refused as a handshake
PROBE_REFUSALS = 1


# ------------------------------------------------------------------------------------------------
# a raw protocol client


class Closed(Exception):
    """The server closed the connection (EOF) where a frame was expected."""


class PeerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"ERROR {code}: {message}")
        self.code, self.message = code, message


def parse_error(body):
    assert len(body) >= 2, f"ERROR frame of {len(body)} bytes: no code"
    code = struct.unpack(">H", body[:2])[0]
    assert len(body) - 2 <= 1024, f"ERROR message of {len(body) - 2} bytes (at most 1024)"
    return code, body[2:].decode("utf-8")  # strict: the message must be UTF-8


class Client:
    """One TLS 1.3 connection to a peer server, speaking frames by hand."""

    def __init__(self, port, ca, cert=None, key=None, timeout=10.0, tls_max=None, source=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca))
        if tls_max is None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            ctx.maximum_version = tls_max
        if cert:
            ctx.load_cert_chain(str(cert), str(key))
        # source: another loopback address (127.0.0.0/8), to stand for another host; the server
        # shares its handshake slots out by address.
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        if tls_max is None:
            assert self.sock.version() == "TLSv1.3", self.sock.version()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # frames

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, ftype, body=b""):
        self.sock.sendall(struct.pack(">BI", ftype, len(body)) + body)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), MiB))
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_frame(self):
        ftype, length = struct.unpack(">BI", self.recv_exact(5))
        assert ftype in MAX_BODY, f"server sent a frame of unknown type 0x{ftype:02x}"
        assert length <= MAX_BODY[ftype], f"server sent frame 0x{ftype:02x} of {length} bytes"
        return ftype, self.recv_exact(length)

    # messages

    def hello(self, version=1, token=b"", magic=b"DRUN", traceparent=b""):
        body = magic + struct.pack(">HH", version, len(token)) + token
        if version >= 2:  # version 2: the caller's W3C traceparent, 0 or 55 bytes
            body += struct.pack(">B", len(traceparent)) + traceparent
        self.send_frame(HELLO, body)

    def welcome(self, version=1, token=b"", features=0, traceparent=b""):
        """HELLO, then expect WELCOME (in the caller's version, these features: 0 unless RDMA is
        offered)."""
        self.hello(version, token, traceparent=traceparent)
        ftype, body = self.read_frame()
        if ftype == ERROR:
            raise PeerError(*parse_error(body))
        assert ftype == WELCOME, f"expected WELCOME, got frame 0x{ftype:02x} {body!r}"
        assert len(body) == 4, body
        assert struct.unpack(">HH", body) == (version, features), body
        return self

    def read_answer(self):
        """BODY + DATA frames -> bytes; ERROR -> PeerError."""
        ftype, body = self.read_frame()
        if ftype == ERROR:
            raise PeerError(*parse_error(body))
        assert ftype == BODY, f"expected BODY or ERROR, got frame 0x{ftype:02x}"
        assert len(body) == 8, f"BODY of {len(body)} bytes"
        total = struct.unpack(">Q", body)[0]
        assert total <= MAX_ANSWER, f"answer of {total} bytes"
        out = bytearray()
        while len(out) < total:
            ftype, chunk = self.read_frame()
            assert ftype == DATA, f"expected DATA, got frame 0x{ftype:02x}"
            assert 1 <= len(chunk) <= MiB, f"DATA frame of {len(chunk)} bytes"
            out += chunk
            assert len(out) <= total, f"DATA frames add up to more than the {total} announced"
        return bytes(out)

    def get_bundle(self, artifact_hex):
        self.send_frame(GET_BUNDLE, bytes.fromhex(artifact_hex))
        return self.read_answer()

    def get_have(self, artifact_hex):
        """-> (piece count, bitfield bytes)"""
        self.send_frame(GET_HAVE, bytes.fromhex(artifact_hex))
        ans = self.read_answer()
        assert len(ans) >= 4, ans
        count = struct.unpack(">I", ans[:4])[0]
        bits = ans[4:]
        assert len(bits) == (count + 7) // 8, f"{count} pieces but a bitfield of {len(bits)} bytes"
        return count, bits

    def get_piece(self, artifact_hex, file_index, piece_index):
        self.send_frame(GET_PIECE, bytes.fromhex(artifact_hex) + struct.pack(">II", file_index, piece_index))
        return self.read_answer()

    def expect_error(self, code):
        """The next frame must be ERROR `code`; returns its message."""
        ftype, body = self.read_frame()
        assert ftype == ERROR, f"expected ERROR {code}, got frame 0x{ftype:02x} {body[:64]!r}"
        got, message = parse_error(body)
        assert got == code, f"expected ERROR {code}, got ERROR {got}: {message!r}"
        return message

    def expect_closed(self, within=5.0):
        """The server must have closed the connection (EOF or reset) within `within` seconds and
        sent nothing more."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"the server did not close the connection within {within} s")
        except (ssl.SSLError, ConnectionError):
            return
        assert data == b"", f"the server sent more after it should have closed: {data[:64]!r}"



# ------------------------------------------------------------------------------------------------
# a lying server


class LyingPeer:
    """A peer that speaks the protocol correctly and serves every piece with one byte flipped.
    It speaks version 1; strict_v1 makes it refuse any other HELLO as a server from before
    version 2 did (the trace context read as trailing bytes: bad_request)."""

    def __init__(self, pki, model, sig, manifest, refuse=False, strict_v1=False, listen=("127.0.0.1", 0)):
        """pki: a peerkit.PKI (which issues the liar a certificate) or (cert, key, CA) paths."""
        self.refuse = refuse  # announce every piece, then answer "not found" to every request
        self.strict_v1 = strict_v1
        self.hellos = []      # the version of each HELLO received
        cert, key, ca = (*pki.issue("liar"), pki.ca) if hasattr(pki, "issue") else pki
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(cert, key)
        self.ctx.load_verify_locations(ca)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.model, self.sig = Path(model), Path(sig)
        self.ranges = []  # (file name, file index, begin, end) per piece
        shard = manifest["shard_size"]
        for fi, f in enumerate(manifest["files"]):
            for k in range(f["pieces"]):
                self.ranges.append((f["name"], fi, k * shard, min(f["size"], (k + 1) * shard)))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(16)
        self.addr = f"{listen[0]}:{self.sock.getsockname()[1]}"
        self.served = 0
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    @staticmethod
    def read_exact(s, n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def send(self, s, t, body):
        s.sendall(struct.pack(">BI", t, len(body)) + body)

    def answer(self, s, data):
        self.send(s, 0x82, struct.pack(">Q", len(data)))
        for i in range(0, len(data), 1 << 20):
            self.send(s, 0x83, data[i:i + (1 << 20)])

    def session(self, conn):
        try:
            s = self.ctx.wrap_socket(conn, server_side=True)
            t, n = struct.unpack(">BI", self.read_exact(s, 5))
            hello = self.read_exact(s, n)
            version, token_len = struct.unpack(">HH", hello[4:8])
            self.hellos.append(version)
            if self.strict_v1 and len(hello) != 8 + token_len:
                msg = b"expected a HELLO frame"
                self.send(s, 0x84, struct.pack(">H", 1) + msg)
                s.close()
                return
            self.send(s, 0x81, struct.pack(">HH", 1, 0))
            while True:
                t, n = struct.unpack(">BI", self.read_exact(s, 5))
                body = self.read_exact(s, n)
                if t == 0x03:
                    count = len(self.ranges)
                    bits = ((1 << count) - 1) << (-count % 8)  # every piece; the padding bits 0
                    self.answer(s, struct.pack(">I", count) + bits.to_bytes((count + 7) // 8, "big"))
                elif t == 0x02:
                    self.answer(s, self.sig.read_bytes())
                elif t == 0x04 and self.refuse:
                    self.served += 1
                    msg = b"piece is not stored here (yet)"
                    self.send(s, 0x84, struct.pack(">H", 5) + msg)
                elif t == 0x04:
                    fi, pi = struct.unpack(">II", body[32:40])
                    name, _, b, e = self.ranges[pi]
                    with open(self.model / name, "rb") as f:
                        f.seek(b)
                        data = bytearray(f.read(e - b))
                    if data:  # (signed pieces are never empty)
                        data[len(data) // 2] ^= 0x40
                    self.served += 1
                    self.answer(s, bytes(data))
        except (OSError, EOFError, ssl.SSLError):
            pass

    def stop(self):
        self.sock.close()


# ------------------------------------------------------------------------------------------------
# process introspection


def proc_status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def threads(pid):
    return int(proc_status(pid)["Threads"])


def rss_mib(pid, field="VmRSS"):
    v = proc_status(pid)[field]
    assert v.endswith("kB"), v
    return int(v.split()[0]) / 1024


def wait_until(pred, timeout, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def main():
    ap = argparse.ArgumentParser(description="a lying peer: every piece it serves has one byte flipped")
    ap.add_argument("mode", choices=["liar"])
    ap.add_argument("--listen", required=True, help="IP:PORT")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--signature", required=True)
    ap.add_argument("--manifest", required=True, help="`drun manifest --json` of the signature, in a file")
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    manifest = json.loads(Path(a.manifest).read_text())
    LyingPeer((a.cert, a.key, a.ca), a.model, a.signature, manifest, listen=(host, int(port)))
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
