"""The peer protocol spoken by hand (docs/peer-protocol.md): a raw TLS 1.3 client (standard
library only) for tests that attack a `drun serve` from outside, and /proc introspection of the
server process. Used by test_peer_protocol.py and soak.py."""

import socket
import ssl
import struct
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
