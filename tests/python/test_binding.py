"""The Python binding (bindings/python): every public API, its failure paths, and its promises —
errors as typed drun.Error subclasses saying what failed and where, buffers filled in place, the GIL
released while a fetch blocks, peers over mutual TLS in-process, safetensors decrypted straight into
arrays, and .pyi stubs that match the compiled module. Origins and peers are real servers on loopback
(nginx; drun.PeerServer with a PKI made by openssl)."""

import ast
import base64
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from binding_kit import (STUB, Publisher, bf16_bits, binding_pythonpath, files_containing, flip_byte, needles_of,
                         raw_safetensors, require_binding, safetensors_bytes, tensor, tree_digests, write_node_key)

drun = require_binding()
np = pytest.importorskip("numpy")

from peerkit import PKI  # noqa: E402
from test_fetch import Hostile, Nginx, issue_client_cert, make_ca_and_server_cert  # noqa: E402

MiB = 1 << 20
P = 65536  # piece size of the small models


@pytest.fixture(scope="module")
def publisher(tmp_path_factory):
    return Publisher(drun, tmp_path_factory.mktemp("publisher"))


@pytest.fixture
def key_source(tmp_path):
    return write_node_key(tmp_path / "node.key")


@pytest.fixture
def small(tmp_path, publisher):
    """A model of 1 + 5 + 1 pieces of 64 KiB: (dir, signature, artifact id, {name: bytes})."""
    files = {"config.json": b'{"hidden": 64}', "w.bin": os.urandom(4 * P + 1234), "tok/vocab.txt": b"a\nb\nc\n"}
    root, sig, art = publisher.model(tmp_path / "small", files, piece_size=P)
    return root, sig, art, files


@pytest.fixture
def store(tmp_path, key_source):
    return drun.Store(str(tmp_path / "store"), key_source=key_source)


def imported(store, small, publisher):
    root, sig, _, _ = small
    return store.import_model(str(root), signature=str(sig), public_key=str(publisher.pub))


def data_file(store_dir, artifact, index):
    """STORE/artifacts/<id>/data/<file index>: a file's ciphertext at its plaintext offsets."""
    return Path(store_dir) / "artifacts" / artifact / "data" / str(index)


# ------------------------------------------------------------------------------------------------
# keygen, sign, verify


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521"])
def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path, kind):
    key = tmp_path / "k.pem"
    assert drun.keygen(kind, str(key)) is None
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in Path(f"{key}.pub").read_bytes()
    before = key.read_bytes(), Path(f"{key}.pub").read_bytes()
    with pytest.raises(drun.ConfigError, match="refusing to overwrite") as info:
        drun.keygen(kind, str(key))
    assert info.value.code == "invalid_argument" and info.value.path == str(key)
    assert (key.read_bytes(), Path(f"{key}.pub").read_bytes()) == before
    # A public key alone in the way is refused too, and no private key is left behind.
    lone = tmp_path / "lone.pem"
    Path(f"{lone}.pub").write_text("keep me")
    with pytest.raises(drun.ConfigError, match="refusing to overwrite"):
        drun.keygen(kind, str(lone))
    assert not lone.exists() and Path(f"{lone}.pub").read_text() == "keep me"


def test_keygen_refuses_an_unknown_type(tmp_path):
    with pytest.raises(drun.ConfigError, match="unknown key type") as info:
        drun.keygen("rsa-2048", str(tmp_path / "k"))
    assert info.value.code == "invalid_argument"
    assert not list(tmp_path.iterdir())


def test_sign_and_verify_report_what_was_signed(tmp_path, publisher):
    m = tmp_path / "m"
    (m / "sub").mkdir(parents=True)
    (m / "w.bin").write_bytes(os.urandom(3 * P + 5))
    (m / "sub" / "a.txt").write_bytes(b"hello")
    sig = drun.sign(str(m), str(publisher.key), piece_size=P)
    assert sig == str(m / "model.sig") and (m / "model.sig").is_file()  # the default place, inside the model
    vm = drun.verify(str(m), public_key=str(publisher.pub))  # finds it there, and does not hash it
    assert isinstance(vm, drun.VerifiedManifest)
    assert len(vm.artifact_id) == 64 and int(vm.artifact_id, 16) >= 0
    assert vm.files == [{"name": "sub/a.txt", "size": 5, "pieces": 1},
                        {"name": "w.bin", "size": 3 * P + 5, "pieces": 4}]
    assert (vm.piece_count, vm.piece_size, vm.hash, vm.method) == (5, P, "sha256", "shards")
    assert vm.signer["method"] == "key" and len(vm.signer["key_hint"]) == 64 and vm.signer["subject"] == ""
    assert vm.subject == "m"
    assert vm.artifact_id[:16] in repr(vm)
    # The same bytes signed again give the same artifact id.
    again = drun.sign(str(m), str(publisher.key), signature=str(tmp_path / "2.sig"), piece_size=P, ignore=["model.sig"])
    assert drun.verify(str(m), signature=again, public_key=str(publisher.pub)).artifact_id == vm.artifact_id


def test_sign_options_files_blake2b_ignore(tmp_path, publisher):
    m = tmp_path / "m"
    m.mkdir()
    (m / "w.bin").write_bytes(os.urandom(10000))
    (m / "scratch.tmp").write_bytes(b"not part of the model")
    sig = str(tmp_path / "m.sig")
    drun.sign(str(m), str(publisher.key), signature=sig, method="files", hash="blake2b", ignore=["scratch.tmp"],
              threads=2)
    (m / "scratch.tmp").write_bytes(b"changed: ignored, as the signed statement records")
    vm = drun.verify(str(m), signature=sig, public_key=str(publisher.pub), threads=1)
    assert (vm.method, vm.hash, vm.files) == ("files", "blake2b", [{"name": "w.bin", "size": None, "pieces": 1}])
    assert vm.piece_count == 1
    (m / "other.tmp").write_bytes(b"not ignored")
    with pytest.raises(drun.VerificationError, match="other.tmp") as info:
        drun.verify(str(m), signature=sig, public_key=str(publisher.pub))
    assert info.value.code == "model_mismatch"


@pytest.mark.parametrize("kwargs, what", [({"method": "tree"}, "method"), ({"hash": "md5"}, "hash"),
                                          ({"piece_size": 1000}, "piece size")])
def test_sign_refuses_bad_options(tmp_path, small, publisher, kwargs, what):
    with pytest.raises(drun.ConfigError, match=what) as info:
        drun.sign(str(small[0]), str(publisher.key), signature=str(tmp_path / "x.sig"), **kwargs)
    assert info.value.code == "invalid_argument"
    assert not (tmp_path / "x.sig").exists()


def test_verify_names_the_tampered_file_and_byte_range(small, publisher):
    root, sig, _, _ = small
    flip_byte(root / "w.bin", 2 * P + 7)
    with pytest.raises(drun.VerificationError) as info:
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
    e = info.value
    assert (e.code, e.path, e.range) == ("digest_mismatch", "w.bin", (2 * P, 3 * P))
    assert "w.bin" in str(e) and f"[{2 * P}, {3 * P})" in str(e) and "digest mismatch" in str(e)
    assert isinstance(e, drun.Error) and isinstance(e, Exception)


def test_verify_refuses_extra_and_missing_files(small, publisher):
    root, sig, _, _ = small
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(drun.VerificationError, match="extra.bin") as info:
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
    assert info.value.code == "model_mismatch"
    os.remove(root / "extra.bin")
    os.remove(root / "config.json")
    with pytest.raises(drun.VerificationError, match="config.json") as info:
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
    assert info.value.code == "model_mismatch"


def test_verify_refuses_an_untrusted_key_and_a_modified_bundle(tmp_path, small, publisher):
    root, sig, _, _ = small
    other = Publisher(drun, tmp_path / "other", "ecdsa-p256")
    with pytest.raises(drun.VerificationError, match="public key") as info:
        drun.verify(str(root), signature=str(sig), public_key=str(other.pub))
    assert info.value.code == "signature_invalid"

    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["subject"][0]["name"] = "renamed"
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = tmp_path / "forged.sig"
    forged.write_text(json.dumps(bundle))
    with pytest.raises(drun.VerificationError, match="does not verify") as info:
        drun.verify(str(root), signature=str(forged), public_key=str(publisher.pub))
    assert info.value.code == "signature_invalid"

    (tmp_path / "garbage.sig").write_text("{")
    with pytest.raises(drun.VerificationError) as info:
        drun.verify(str(root), signature=str(tmp_path / "garbage.sig"), public_key=str(publisher.pub))
    assert info.value.code == "malformed_bundle"


def test_missing_or_unsafe_keys_are_configuration_errors(tmp_path, small, publisher):
    root, sig, _, _ = small
    with pytest.raises(drun.ConfigError) as info:
        drun.verify(str(root), signature=str(sig), public_key=str(tmp_path / "absent.pub"))
    assert (info.value.code, info.value.path) == ("not_found", str(tmp_path / "absent.pub"))
    with pytest.raises(drun.ConfigError) as info:
        drun.sign(str(root), str(tmp_path / "absent.key"), signature=str(tmp_path / "x.sig"))
    assert info.value.code == "not_found"
    with pytest.raises(drun.ConfigError, match="0644") as info:  # a private key others can read
        drun.sign(str(root), str(publisher.pub), signature=str(tmp_path / "x.sig"))
    assert info.value.code == "key_error"
    with pytest.raises(drun.ConfigError, match="exactly one"):
        drun.verify(str(root), signature=str(sig))
    with pytest.raises(drun.ConfigError, match="exactly one"):
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub), ca_bundle=str(publisher.pub))


@pytest.mark.parametrize("call", ["verify: missing model", "verify: missing signature", "sign: missing model",
                                  "import_model: missing model", "fetch: missing signature file"])
def test_a_missing_input_file_is_a_configuration_error(tmp_path, small, publisher, store, call):
    """drun.ConfigError is "an unusable argument, key, certificate or file: fix the call"; StoreError is
    "the encrypted store could not read or write", which these calls (most touch no store) cannot mean."""
    root, sig, _, _ = small
    absent = str(tmp_path / "absent")
    pub = str(publisher.pub)
    calls = {
        "verify: missing model": lambda: drun.verify(absent, signature=str(sig), public_key=pub),
        "verify: missing signature": lambda: drun.verify(str(root), signature=absent, public_key=pub),
        "sign: missing model": lambda: drun.sign(absent, str(publisher.key), signature=str(tmp_path / "x.sig")),
        "import_model: missing model": lambda: store.import_model(absent, signature=str(sig), public_key=pub),
        "fetch: missing signature file": lambda: drun.fetch(store=store, signature=absent, public_key=pub,
                                                            origins=["http://127.0.0.1:9/"]),
    }
    with pytest.raises(drun.Error) as info:
        calls[call]()
    e = info.value
    assert e.code == "not_found" and e.path.startswith(absent), (type(e).__name__, e.code, e.path, str(e))
    assert type(e) is drun.ConfigError, f"{call} raised {type(e).__name__}({str(e)!r}), not ConfigError"


# ------------------------------------------------------------------------------------------------
# the store


def test_store_import_list_files(store, small, publisher):
    root, sig, art, files = small
    assert store.list() == []
    assert imported(store, small, publisher) == art
    (a,) = store.list()
    assert (a["id"], a["subject"], a["bytes"], a["pieces"], a["stored_pieces"], a["pinned"]) == \
        (art, "small", sum(map(len, files.values())), 7, 7, False)
    assert abs(a["last_access"] - time.time()) < 120
    assert store.files(art) == [
        {"name": "config.json", "size": len(files["config.json"]), "pieces": 1, "stored_pieces": 1},
        {"name": "tok/vocab.txt", "size": len(files["tok/vocab.txt"]), "pieces": 1, "stored_pieces": 1},
        {"name": "w.bin", "size": 4 * P + 1234, "pieces": 5, "stored_pieces": 5}]
    assert store.files(art[:12]) == store.files(art)  # a unique prefix names the artifact
    assert imported(store, small, publisher) == art and len(store.list()) == 1  # idempotent


def test_store_import_refuses_a_tampered_model_and_what_it_stores_is_sealed(tmp_path, store, small, publisher):
    root, sig, art, files = small
    flip_byte(root / "w.bin", 3 * P + 1)
    with pytest.raises(drun.VerificationError) as info:
        imported(store, small, publisher)
    assert (info.value.code, info.value.path, info.value.range) == ("digest_mismatch", "w.bin", (3 * P, 4 * P))
    assert not files_containing(tmp_path / "store", needles_of(files["w.bin"], count=16))


def test_store_read_fills_bytearray_memoryview_and_numpy_in_place(store, small, publisher):
    art = imported(store, small, publisher)
    w = small[3]["w.bin"]
    buf = bytearray(5000)
    assert store.read(art, "w.bin", P - 100, buf) is None  # across a piece boundary
    assert bytes(buf) == w[P - 100:P + 4900]

    # Zero-copy: decrypted straight into a slice of a larger numpy array, nothing around it touched.
    big = np.full(3 * P, 0xA5, dtype=np.uint8)
    before = big.ctypes.data
    store.read(art, "w.bin", 2 * P + 3, memoryview(big)[1000:1000 + P])
    assert big.ctypes.data == before
    assert big[1000:1000 + P].tobytes() == w[2 * P + 3:3 * P + 3]
    assert (big[:1000] == 0xA5).all() and (big[1000 + P:] == 0xA5).all()

    # A typed array of any itemsize receives the raw bytes.
    f32 = np.zeros(256, dtype=np.float32)
    store.read(art, "w.bin", 0, f32)
    assert f32.tobytes() == w[:1024]
    # The tail of the last, short piece; and an empty read.
    tail = bytearray(1234)
    store.read(art, "w.bin", 4 * P, tail)
    assert bytes(tail) == w[4 * P:]
    store.read(art, "w.bin", 4 * P + 1234, bytearray())
    # A slice view of a numpy array (contiguous) works too.
    view = np.zeros(100, dtype=np.uint8)[10:60]
    store.read(art, "w.bin", 7, view)
    assert view.tobytes() == w[7:57]


def test_store_read_refuses_a_read_only_buffer(store, small, publisher):
    art = imported(store, small, publisher)
    frozen = np.zeros(16, np.uint8)
    frozen.setflags(write=False)
    for ro in (b"\0" * 16, memoryview(bytearray(16)).toreadonly(), frozen):
        with pytest.raises(drun.ConfigError, match="read-only") as info:
            store.read(art, "w.bin", 0, ro)
        assert info.value.code == "invalid_argument"
    assert not frozen.any()


def test_store_read_argument_errors(store, small, publisher):
    art = imported(store, small, publisher)
    with pytest.raises(drun.ConfigError, match="past the end") as info:
        store.read(art, "w.bin", 4 * P + 1000, bytearray(1000))
    assert (info.value.code, info.value.path) == ("invalid_argument", "w.bin")
    with pytest.raises(drun.ConfigError, match="not C-contiguous"):
        store.read(art, "w.bin", 0, np.zeros((8, 8), np.uint8)[:, ::2])
    with pytest.raises(drun.ConfigError, match="no artifact"):
        store.read("0" * 64, "w.bin", 0, bytearray(10))
    with pytest.raises(TypeError):
        store.read(art, "w.bin", 0, 42)


def test_store_read_of_a_file_the_artifact_lacks_is_a_configuration_error(store, small, publisher):
    """Like an unknown artifact id (ConfigError), an unknown file name is a call to fix."""
    art = imported(store, small, publisher)
    with pytest.raises(drun.Error) as info:
        store.read(art, "absent.bin", 0, bytearray(10))
    assert (info.value.code, info.value.path) == ("not_found", "absent.bin")
    assert type(info.value) is drun.ConfigError, f"raised {type(info.value).__name__}({info.value})"


def test_store_read_of_a_corrupt_piece_wipes_the_buffer_and_drops_the_piece(tmp_path, store, small, publisher):
    art = imported(store, small, publisher)
    flip_byte(data_file(tmp_path / "store", art, 2), P + 10)  # w.bin is file 2; its piece 1
    buf = bytearray(b"\x77" * (3 * P))
    with pytest.raises(drun.VerificationError, match="authentication tag") as info:
        store.read(art, "w.bin", 0, buf)
    assert (info.value.code, info.value.path, info.value.range) == ("digest_mismatch", "w.bin", (P, 2 * P))
    assert buf == bytearray(3 * P), "the buffer must be wiped on failure, not left half-filled"
    assert store.files(art)[2]["stored_pieces"] == 4
    assert store.verify() == []  # what is left is intact
    imported(store, small, publisher)  # a re-import repairs it
    store.read(art, "w.bin", 0, buf)
    assert bytes(buf) == small[3]["w.bin"][:3 * P]


def test_store_verify_scrubs_and_reports_failures(tmp_path, store, small, publisher):
    art = imported(store, small, publisher)
    assert store.verify() == [] and store.verify(art) == []
    flip_byte(data_file(tmp_path / "store", art, 2), 3 * P + 5)
    (f,) = store.verify(art)
    assert (f["artifact"], f["file"], f["piece"], f["range"]) == (art, "w.bin", 5, (3 * P, 4 * P))
    assert "authentication tag" in f["reason"]
    assert store.verify() == []  # the bad piece was dropped
    with pytest.raises(drun.ConfigError, match="no artifact"):
        store.verify("f" * 64)


def test_store_materialize_is_bit_identical_and_refuses_a_non_empty_destination(tmp_path, store, small, publisher):
    art = imported(store, small, publisher)
    store.materialize(art, str(tmp_path / "out"))
    assert tree_digests(tmp_path / "out") == tree_digests(small[0])
    with pytest.raises(drun.ConfigError, match="not an empty directory"):
        store.materialize(art, str(tmp_path / "out"))


def test_materializing_an_incomplete_artifact_is_a_store_error(tmp_path, store, small, publisher):
    """drun.StoreError's contract names "missing piece"; nothing here failed to match a signature."""
    art = imported(store, small, publisher)
    flip_byte(data_file(tmp_path / "store", art, 2), 5)
    assert len(store.verify(art)) == 1  # piece dropped: now missing
    with pytest.raises(drun.Error) as info:
        store.materialize(art, str(tmp_path / "out"))
    assert info.value.path == "w.bin" and info.value.range == (0, P), (info.value.path, info.value.range)
    assert not (tmp_path / "out" / "w.bin").exists()
    assert type(info.value) is drun.StoreError, f"raised {type(info.value).__name__}({info.value})"


def test_store_pin_unpin_remove_gc(tmp_path, store, small, publisher):
    art = imported(store, small, publisher)
    other_root, other_sig, other_art = publisher.model(tmp_path / "other", {"x.bin": os.urandom(1000)}, piece_size=P)
    store.import_model(str(other_root), signature=str(other_sig), public_key=str(publisher.pub))
    store.pin(art)
    assert {a["id"]: a["pinned"] for a in store.list()} == {art: True, other_art: False}
    assert store.gc(ttl_seconds=3600) == []  # nothing is that old
    assert store.gc(high=0, low=0) == [other_art]  # over the limit: the unpinned one goes
    assert [a["id"] for a in store.list()] == [art]
    assert store.gc(ttl_seconds=0) == []  # pinned artifacts stay
    store.unpin(art)
    assert store.list()[0]["pinned"] is False
    assert store.gc(ttl_seconds=0) == [art]
    assert store.list() == [] and not (tmp_path / "store" / "artifacts" / art).exists()

    art = imported(store, small, publisher)
    store.remove(art)
    assert store.list() == []
    for call in (store.remove, store.pin, store.unpin, store.files):
        with pytest.raises(drun.ConfigError, match="no artifact"):
            call(art)


def test_store_keys_and_key_sources(tmp_path, small, publisher, monkeypatch):
    ks = write_node_key(tmp_path / "a.key")
    s = drun.Store(str(tmp_path / "s"), key_source=ks)
    art = imported(s, small, publisher)
    del s
    with pytest.raises(drun.ConfigError, match="another node key") as info:  # a wrong key never opens it
        drun.Store(str(tmp_path / "s"), key_source=write_node_key(tmp_path / "b.key"))
    assert info.value.code == "key_error"
    monkeypatch.setenv("DRUN_TEST_NODE_KEY", (tmp_path / "a.key").read_text().strip())
    assert drun.Store(str(tmp_path / "s"), key_source="env:DRUN_TEST_NODE_KEY").list()[0]["id"] == art
    assert drun.Store(str(tmp_path / "s"), key_source=f"cmd:cat {tmp_path / 'a.key'}").list()[0]["id"] == art
    os.chmod(tmp_path / "a.key", 0o644)
    with pytest.raises(drun.ConfigError, match="0644") as info:
        drun.Store(str(tmp_path / "s"), key_source=ks)
    assert info.value.code == "key_error"
    with pytest.raises(drun.ConfigError) as info:
        drun.Store(str(tmp_path / "s"), key_source=f"file:{tmp_path / 'absent.key'}")
    assert info.value.code == "key_error" and "absent.key" in str(info.value)
    with pytest.raises(drun.ConfigError, match="file:PATH, env:NAME or cmd:COMMAND"):
        drun.Store(str(tmp_path / "s"), key_source="plain-text-key")
    with pytest.raises(TypeError):
        drun.Store(str(tmp_path / "s"), ks)  # key_source is keyword-only


def test_store_keeps_no_plaintext_at_rest(tmp_path, store, small, publisher):
    imported(store, small, publisher)
    key = bytes.fromhex((tmp_path / "node.key").read_text().strip())
    needles = needles_of(small[3]["w.bin"], count=16) + [key, key.hex().encode(), base64.b64encode(key)]
    assert not files_containing(tmp_path / "store", needles)


# ------------------------------------------------------------------------------------------------
# fetch from an origin


@pytest.fixture
def origin(tmp_path, small):
    srv = Nginx(tmp_path, small[0])
    yield srv
    srv.stop()


def test_fetch_from_nginx_with_a_progress_callback(tmp_path, store, small, publisher, origin):
    root, sig, art, files = small
    seen, threads = [], set()

    def progress(p):
        seen.append(dict(p))  # runs Python freely: the GIL is held
        threads.add(threading.get_ident())

    got = drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[origin.url()],
                     progress=progress, out=str(tmp_path / "out"), connections=2)
    assert got == art
    assert tree_digests(tmp_path / "out") == tree_digests(root)
    assert len(seen) == 7, seen  # after every stored piece
    assert set(seen[0]) == {"bytes_done", "bytes_total", "pieces_done", "pieces_total", "bytes_per_second",
                            "seconds_left"}
    total = sum(map(len, files.values()))
    assert [p["pieces_done"] for p in seen] == list(range(1, 8))
    assert all(p["bytes_total"] == total and p["pieces_total"] == 7 for p in seen)
    assert all(a["bytes_done"] < b["bytes_done"] for a, b in zip(seen, seen[1:]))
    assert seen[-1]["bytes_done"] == total and seen[-1]["seconds_left"] == 0
    assert all(p["bytes_per_second"] > 0 for p in seen)
    assert threading.get_ident() not in threads, "the callback ran on the calling thread, not drun's workers"
    assert origin.bytes_sent("w.bin") == len(files["w.bin"])

    # A second fetch has nothing to bring: no transfer, no progress.
    seen.clear()
    assert drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[origin.url()],
                      progress=progress) == art
    assert seen == [] and origin.bytes_sent("w.bin") == len(files["w.bin"])


def test_fetch_from_a_registry_with_credentials_from_an_auth_file(tmp_path, store, small, publisher, drun_bin):
    """oci:// origins and bundles through the binding: the model pushed by the CLI into a real
    registry behind htpasswd, pulled with registry_auth= (a Docker config.json)."""
    from test_registry import PASSWORD, USER, Registry
    import subprocess

    root, sig, art, files = small
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    reg = Registry(tmp_path, {"ca": ca, "cert": cert, "key": key}, auth="htpasswd")
    try:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {reg.host: {"username": USER, "password": PASSWORD}}}))
        auth.chmod(0o600)
        subprocess.run([drun_bin, "push", str(root), reg.ref("small/model:v1"), "--signature", str(sig), "--ca-cert",
                        str(ca), "--registry-auth", str(auth)], check=True, capture_output=True)
        got = drun.fetch(store=store, signature=reg.ref("small/model:v1"), public_key=str(publisher.pub),
                         origins=[reg.ref("small/model:v1")], ca_cert=str(ca), registry_auth=str(auth),
                         out=str(tmp_path / "out"))
        assert got == art
        assert tree_digests(tmp_path / "out") == tree_digests(root)
        with pytest.raises(drun.Error) as e:  # anonymous: the registry refuses
            drun.fetch(store=store, signature=reg.ref("small/model:v1"), public_key=str(publisher.pub),
                       origins=[reg.ref("small/model:v1")], ca_cert=str(ca))
        assert "asks for credentials" in str(e.value)
    finally:
        reg.stop()


def test_fetch_from_an_origin_demanding_a_client_certificate(tmp_path, store, small, publisher):
    root, sig, art, files = small
    clients, _, _ = make_ca_and_server_cert(tmp_path / "clients", "origin clients CA")
    cert, key = issue_client_cert(tmp_path / "clients", "node-3")
    srv = Nginx(tmp_path, root, client_ca=clients)
    try:
        with pytest.raises(drun.SourceError, match="400"):
            drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[srv.mtls_url()],
                       ca_cert=str(srv.ca))
        with pytest.raises(drun.ConfigError, match="together"):
            drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[srv.mtls_url()],
                       ca_cert=str(srv.ca), origin_cert=str(cert))
        got = drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[srv.mtls_url()],
                         ca_cert=str(srv.ca), origin_cert=str(cert), origin_key=str(key), out=str(tmp_path / "out"))
        assert got == art and tree_digests(tmp_path / "out") == tree_digests(root)
        assert {r[3] for r in srv.mtls_requests() if r[0] == 206} == {"CN=node-3"}
    finally:
        srv.stop()


def test_fetch_bundle_by_url_over_https_with_a_test_ca(tmp_path, store, small, publisher, origin):
    root, sig, art, _ = small
    (root / "model.sig").write_bytes(sig.read_bytes())  # served next to the model, as a hub does
    got = drun.fetch(store=store, signature=origin.tls_url("model.sig"), public_key=str(publisher.pub),
                     origins=[origin.tls_url()], ca_cert=str(origin.ca), headers=["X-Drun-Test: 1"])
    assert got == art and store.list()[0]["stored_pieces"] == 7
    with pytest.raises(drun.SourceError, match="certificate") as info:  # without the CA: refused
        drun.fetch(store=drun.Store(str(tmp_path / "s2"), key_source=write_node_key(tmp_path / "k2")),
                   signature=origin.tls_url("model.sig"), public_key=str(publisher.pub), origins=[origin.tls_url()])
    assert info.value.code == "io_error"


def test_fetch_headers_go_to_one_origin_only(tmp_path, store, small, publisher):
    """Security review, finding 7: headers= went to every origin and to the signature URL's host.
    Now they go to one origin: the first of origins=, or the one credentials_origin= names."""
    root, sig, art, _ = small
    hub, mirror, bundles = Hostile(root, "plain"), Hostile(root, "plain"), Hostile(root, "plain")
    (root / "model.sig").write_bytes(sig.read_bytes())
    token = ["Authorization: Bearer s3cr3t-token"]
    try:
        got = drun.fetch(store=store, signature=bundles.url() + "/model.sig", public_key=str(publisher.pub),
                         origins=[hub.url(), mirror.url()], headers=token)
        assert got == art
        assert hub.auth_seen and all(a == "Bearer s3cr3t-token" for a in hub.auth_seen), hub.auth_seen
        assert all(a is None for a in mirror.auth_seen), mirror.auth_seen
        assert bundles.auth_seen == [None], bundles.auth_seen
        # Named explicitly: the mirror gets them, the hub does not.
        for s in (hub, mirror, bundles):
            s.auth_seen.clear()
        other = drun.Store(str(tmp_path / "s2"), key_source=write_node_key(tmp_path / "k2"))
        drun.fetch(store=other, signature=str(sig), public_key=str(publisher.pub), origins=[hub.url(), mirror.url()],
                   headers=token, credentials_origin=mirror.url())
        assert mirror.auth_seen and all(a == "Bearer s3cr3t-token" for a in mirror.auth_seen), mirror.auth_seen
        assert all(a is None for a in hub.auth_seen), hub.auth_seen
        # Scopes that cannot hold, refused before anything is sent.
        for s in (hub, mirror, bundles):
            s.auth_seen.clear()
        for kwargs, what in [({"headers": token, "credentials_origin": "http://127.0.0.1:1/"}, "origin of no"),
                             ({"headers": token, "origins": ["s3://bucket/m", hub.url()]}, "http(s) origin"),
                             ({"credentials_origin": hub.url()}, "give headers=")]:
            args = {"origins": [hub.url()], **kwargs}
            with pytest.raises(drun.ConfigError, match=what.replace("(", r"\(").replace(")", r"\)")) as info:
                drun.fetch(store=other, signature=str(sig), public_key=str(publisher.pub), **args)
            assert info.value.code == "invalid_argument"
        assert hub.auth_seen == [] and bundles.auth_seen == []
    finally:
        (root / "model.sig").unlink()
        for s in (hub, mirror, bundles):
            s.shutdown()


def test_allow_unsigned_empty_files_warns_and_sign_names_what_shards_leave_out(tmp_path, publisher, small):
    """Security review, finding 6, in Python: an empty file a shards manifest does not list is
    refused; allow_unsigned_empty_files=True accepts it with a warning, every time; sign() warns
    naming the empty files it could not cover."""
    root, sig, _, _ = small
    (root / "__init__.py").write_bytes(b"")
    with pytest.raises(drun.VerificationError, match="__init__.py: an empty file not in the manifest") as info:
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
    assert info.value.code == "model_mismatch"
    with pytest.warns(UserWarning, match="allow_unsigned_empty_files"):
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub), allow_unsigned_empty_files=True)
    import warnings
    with warnings.catch_warnings():  # a warning turned into an error propagates, nothing is left pending
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub), allow_unsigned_empty_files=True)
    with pytest.warns(UserWarning, match=r"cannot sign empty files; not covered: __init__\.py"):
        drun.sign(str(root), str(publisher.key), signature=str(tmp_path / "again.sig"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the files method covers it: no warning
        drun.sign(str(root), str(publisher.key), signature=str(tmp_path / "files.sig"), method="files")
    drun.verify(str(root), signature=str(tmp_path / "files.sig"), public_key=str(publisher.pub))


def test_a_progress_callback_that_raises_stops_the_fetch(tmp_path, store, publisher):
    root, sig, art = publisher.model(tmp_path / "big", {"w.bin": os.urandom(8 * MiB)}, piece_size=MiB)
    srv = Nginx(tmp_path, root)
    try:
        class Stop(Exception):
            pass

        calls = []

        def progress(p):
            calls.append(p)
            raise Stop("enough")

        t0 = time.monotonic()
        with pytest.raises(Stop, match="enough"):
            drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[srv.url()],
                       progress=progress, limit_rate=MiB, connections=2, out=str(tmp_path / "out"))
        assert time.monotonic() - t0 < 4, "the fetch went on after its callback raised (8 MiB at 1 MiB/s)"
        assert len(calls) == 1, "the callback was called again after it raised"
        stored = store.files(art)[0]["stored_pieces"]
        assert 0 < stored < 8 and not (tmp_path / "out").exists()
        # What was stored stays stored: the next fetch brings only the rest.
        time.sleep(0.5)  # nginx logs a request when it ends
        sent = srv.bytes_sent("w.bin")
        drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[srv.url()])
        assert srv.bytes_sent("w.bin") - sent == (8 - stored) * MiB
    finally:
        srv.stop()


def test_two_threads_fetch_concurrently_because_the_gil_is_released(tmp_path, store, publisher):
    models, servers = [], []
    for i in range(2):
        models.append(publisher.model(tmp_path / f"m{i}", {"w.bin": os.urandom(4 * MiB)}, piece_size=MiB))
        (tmp_path / f"o{i}").mkdir()
        servers.append(Nginx(tmp_path / f"o{i}", models[i][0]))  # one origin per model
    events, errors = [], []

    def work(i):
        try:
            _, sig, art = models[i]
            got = drun.fetch(store=drun.Store(str(tmp_path / f"s{i}"), key_source=write_node_key(tmp_path / f"k{i}")),
                             signature=str(sig), public_key=str(publisher.pub), origins=[servers[i].url()],
                             progress=lambda p: events.append((time.monotonic(), i)), limit_rate=2 * MiB,
                             connections=1)
            assert got == art
        except BaseException as e:  # noqa: BLE001  (reported below, from the main thread)
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        # This thread keeps running Python meanwhile, too.
        ticks = 0
        while any(t.is_alive() for t in threads):
            ticks += 1
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
    finally:
        for s in servers:
            s.stop()
    assert not errors, errors
    order = [i for _, i in sorted(events)]
    assert sorted(order) == [0] * 4 + [1] * 4, order
    # Interleaved: each thread made progress before the other finished (serialized fetches would
    # give 0,0,0,0,1,1,1,1), and both together took about as long as one (4 MiB at 2 MiB/s).
    first = {i: min(t for t, j in events if j == i) for i in (0, 1)}
    last = {i: max(t for t, j in events if j == i) for i in (0, 1)}
    assert first[0] < last[1] and first[1] < last[0], order
    assert sum(a != b for a, b in zip(order, order[1:])) >= 3, f"progress did not interleave: {order}"
    assert elapsed < 3.5, f"two 2-second fetches took {elapsed:.1f} s: they ran one after the other"
    assert ticks > 50, "the calling thread was starved while the fetches ran"


def test_fetch_failures_raise_typed_errors(tmp_path, store, small, publisher, origin):
    root, sig, art, files = small
    pub = str(publisher.pub)
    with pytest.raises(drun.ConfigError, match="signature="):
        drun.fetch(store=store, public_key=pub, origins=[origin.url()])
    with pytest.raises(drun.ConfigError, match="signature="):
        drun.fetch(store=store, signature=str(sig), artifact=art, public_key=pub, origins=[origin.url()])
    with pytest.raises(drun.ConfigError, match="origins= and/or peers="):
        drun.fetch(store=store, signature=str(sig), public_key=pub)
    with pytest.raises(drun.ConfigError, match="exactly one"):
        drun.fetch(store=store, signature=str(sig), origins=[origin.url()])
    with pytest.raises(drun.ConfigError, match="ftp://"):
        drun.fetch(store=store, signature=str(sig), public_key=pub, origins=["ftp://example.com/"])
    with pytest.raises(TypeError):
        drun.fetch(store, signature=str(sig), public_key=pub, origins=[origin.url()])  # keyword-only

    other = Publisher(drun, tmp_path / "other", "ecdsa-p256")
    with pytest.raises(drun.VerificationError) as info:  # trust first: nothing is downloaded
        drun.fetch(store=store, signature=str(sig), public_key=str(other.pub), origins=[origin.url()])
    assert info.value.code == "signature_invalid"
    assert origin.bytes_sent("w.bin") == 0 and store.list() == []

    with pytest.raises(drun.SourceError, match="HTTP 404") as info:
        drun.fetch(store=store, signature=origin.url("absent.sig"), public_key=pub, origins=[origin.url()])
    assert origin.url("absent.sig") in str(info.value) and info.value.code == "not_found"

    with pytest.raises(drun.SourceError, match="127.0.0.1:9") as info:  # nothing listens there
        drun.fetch(store=store, signature=str(sig), public_key=pub, origins=["http://127.0.0.1:9/"])
    assert info.value.code == "io_error"


def test_fetch_of_tampered_bytes_raises_verification_error_and_stores_them_nowhere(tmp_path, store, small,
                                                                                    publisher, origin):
    root, sig, art, files = small
    flip_byte(root / "w.bin", 2 * P + 9)
    with pytest.raises(drun.VerificationError) as info:
        drun.fetch(store=store, signature=str(sig), public_key=str(publisher.pub), origins=[origin.url()],
                   out=str(tmp_path / "out"))
    e = info.value
    assert (e.code, e.path, e.range) == ("digest_mismatch", "w.bin", (2 * P, 3 * P)), (e.code, e.path, e.range, str(e))
    assert origin.url().rstrip("/") in str(e), "the message names the source that sent the bad bytes"
    assert e.source == origin.url().rstrip("/"), e.source  # and so do the attributes
    assert isinstance(e.piece, int) and e.piece >= 0, e.piece
    assert not (tmp_path / "out").exists()
    assert store.files(art)[2]["stored_pieces"] == 4 and store.verify() == []


# ------------------------------------------------------------------------------------------------
# peers


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path / "pki")


@pytest.fixture
def seed(tmp_path, store, small, publisher):
    imported(store, small, publisher)
    return store


def leecher(tmp_path, name):
    return drun.Store(str(tmp_path / name), key_source=write_node_key(tmp_path / f"{name}.key"))


def test_peer_server_serves_a_seeded_store_over_mutual_tls(tmp_path, seed, small, publisher, pki):
    root, sig, art, files = small
    cert, key = pki.issue("seed")
    ccert, ckey = pki.issue("loader", uri="spiffe://cluster/ns/ml/sa/loader")
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca)) as srv:
        assert isinstance(srv, drun.PeerServer) and srv.port > 0
        assert srv.stats() == {"connections": 0, "active": 0, "handshake_failures": 0, "busy": 0, "requests": 0,
                               "denied": 0, "protocol_errors": 0, "pieces_served": 0, "bytes_served": 0,
                               "rdma_connections": 0, "pieces_served_rdma": 0}
        got = drun.fetch(store=leecher(tmp_path, "l1"), artifact=art, public_key=str(publisher.pub),
                         peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(ccert), tls_key=str(ckey), ca_cert=str(pki.ca),
                         out=str(tmp_path / "out"))
        assert got == art
        assert tree_digests(tmp_path / "out") == tree_digests(root)
        stats = srv.stats()
        assert stats["pieces_served"] == 7 and stats["bytes_served"] == sum(map(len, files.values())), stats
        port = srv.port
    with pytest.raises(OSError):  # __exit__ stopped it
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The bundle came from the peer, and was verified against our key: another key refuses it.
    other = Publisher(drun, tmp_path / "other", "ecdsa-p256")
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca)) as srv:
        with pytest.raises(drun.VerificationError):
            drun.fetch(store=leecher(tmp_path, "l2"), artifact=art, public_key=str(other.pub),
                       peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(ccert), tls_key=str(ckey), ca_cert=str(pki.ca))
        srv.stop()
        srv.stop()  # idempotent


def _metric(text, name):
    """The value of one sample ("name" or "name{labels}") in an exposition text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition")


def test_metrics_of_the_process_and_of_an_in_process_server(tmp_path, seed, small, publisher, pki):
    import urllib.request
    root, sig, art, files = small
    cert, key = pki.issue("seed")
    ccert, ckey = pki.issue("loader")
    before = drun.metrics()
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca),
                         metrics_listen="127.0.0.1:0") as srv:
        mport = srv.metrics_port
        assert mport > 0
        drun.fetch(store=leecher(tmp_path, "l"), artifact=art, public_key=str(publisher.pub),
                   peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(ccert), tls_key=str(ckey), ca_cert=str(pki.ca))
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            scraped = r.read().decode()
    after = drun.metrics()
    size = sum(map(len, files.values()))
    # One process: the fetch and the server that answered it count in the same registry.
    for name, grew in [('drun_fetch_bytes_total{source="peer"}', size), ("drun_peer_bytes_served_total", size),
                       ('drun_fetch_pieces_total{source="peer"}', 7), ('drun_fetches_total{result="ok"}', 1)]:
        assert _metric(after, name) - _metric(before, name) == grew, name
        assert _metric(scraped, name) == _metric(after, name), name
    # The endpoint closes with the server.
    assert srv.metrics_port == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2)
    out = tmp_path / "m.prom"
    drun.write_metrics_file(str(out))
    assert out.read_text().startswith("# HELP drun_")
    with pytest.raises(drun.Error, match="metrics"):
        drun.write_metrics_file(str(tmp_path / "absent" / "m.prom"))
    with pytest.raises(drun.ConfigError, match="metrics address"):
        drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), metrics_listen="no-port-here")


def test_peer_server_max_connections_turns_the_rest_away_at_once(seed, pki):
    cert, key = pki.issue("seed")
    with pytest.raises(drun.ConfigError, match="max_connections"):
        drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), max_connections=0)
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), max_connections=1) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as first:
            time.sleep(0.2)  # the first holds the only connection (until its first-byte timeout, 2 s)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=1.5) as second:
                assert second.recv(1) == b""  # closed at once, not after a timeout
        assert srv.stats()["busy"] >= 1, srv.stats()


def test_rdma_is_asked_for_with_rdma_true_and_falls_back_where_there_is_none(tmp_path, seed, small, publisher, pki,
                                                                              capfd):
    root, sig, art, files = small
    st = drun.rdma_status()
    assert set(st) == {"available", "reason", "library", "devices"} and isinstance(st["devices"], list), st
    assert st["available"] or st["reason"], st  # never unavailable without a reason
    cert, key = pki.issue("seed")
    ccert, ckey = pki.issue("loader")
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), rdma=True) as srv:
        got = drun.fetch(store=leecher(tmp_path, "l"), artifact=art, public_key=str(publisher.pub),
                         peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(ccert), tls_key=str(ckey), ca_cert=str(pki.ca),
                         out=str(tmp_path / "out"), rdma=True)
        assert got == art and tree_digests(tmp_path / "out") == tree_digests(root)
        stats = srv.stats()
    err = capfd.readouterr().err
    if st["available"]:
        assert stats["pieces_served_rdma"] == stats["pieces_served"] == 7, stats
    else:
        assert stats["rdma_connections"] == 0 and stats["pieces_served"] == 7, stats
        assert f"RDMA is not available ({st['reason']}): peers are served over TCP+TLS" in err, err
        assert err.count("peers are fetched from over TCP+TLS") <= 1, err  # once per process


def test_peer_refuses_a_client_certificate_from_another_ca(tmp_path, seed, small, publisher, pki):
    """The server ends the TLS handshake: to the client that is a failed source (the CLI's exit 3),
    not a policy decision."""
    root, sig, art, _ = small
    cert, key = pki.issue("seed")
    stranger, stranger_key = PKI(tmp_path / "other", "another CA").issue("stranger")
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca)) as srv:
        with pytest.raises(drun.SourceError, match="unknown ca") as info:
            drun.fetch(store=leecher(tmp_path, "l"), artifact=art, public_key=str(publisher.pub),
                       peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(stranger), tls_key=str(stranger_key),
                       ca_cert=str(pki.ca))
        assert info.value.code == "io_error"
        stats = srv.stats()
    assert stats["handshake_failures"] >= 1 and stats["pieces_served"] == 0, stats


def test_peer_policy_admits_one_identity_and_denies_another(tmp_path, seed, small, publisher, pki):
    root, sig, art, _ = small
    cert, key = pki.issue("seed")
    loader = pki.issue("loader", uri="spiffe://cluster/ns/ml/sa/loader")
    intruder = pki.issue("intruder", uri="spiffe://cluster/ns/other/sa/x")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"roles": {"reader": {"artifacts": [art]}}, "bindings": [
        {"certificate": {"uri": "spiffe://cluster/ns/ml/sa/loader"}, "roles": ["reader"]}]}))
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), policy=str(policy)) as srv:
        peer = f"127.0.0.1:{srv.port}"
        with pytest.raises(drun.AuthorizationError, match="spiffe://cluster/ns/other/sa/x") as info:
            drun.fetch(store=leecher(tmp_path, "l1"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       tls_cert=str(intruder[0]), tls_key=str(intruder[1]), ca_cert=str(pki.ca))
        assert info.value.code == "permission_denied" and "denied" in str(info.value)
        with pytest.raises(drun.AuthorizationError):  # with the bundle given, the pieces are refused too
            drun.fetch(store=leecher(tmp_path, "l2"), signature=str(sig), public_key=str(publisher.pub), peers=[peer],
                       tls_cert=str(intruder[0]), tls_key=str(intruder[1]), ca_cert=str(pki.ca))
        assert srv.stats()["pieces_served"] == 0
        got = drun.fetch(store=leecher(tmp_path, "l3"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                         tls_cert=str(loader[0]), tls_key=str(loader[1]), ca_cert=str(pki.ca))
        assert got == art
        stats = srv.stats()
    assert stats["denied"] >= 2 and stats["pieces_served"] == 7, stats


def test_issue_token_and_jwks_for_round_trip_through_a_token_only_peer(tmp_path, seed, small, publisher, pki):
    root, sig, art, _ = small
    cert, key = pki.issue("seed")
    jwks_text = drun.jwks_for(str(publisher.pub))
    jwks = json.loads(jwks_text)
    (k,) = jwks["keys"]
    assert (k["kty"], k["crv"], k["alg"], k["use"]) == ("OKP", "Ed25519", "EdDSA", "sig") and k["kid"]
    (tmp_path / "jwks.json").write_text(jwks_text)

    token = drun.issue_token(str(publisher.key), subject="loader", audience="drun", artifacts=[art], ttl_seconds=600)
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                      for part in token.split(".")[:2])
    assert header["alg"] == "EdDSA" and header["kid"] == k["kid"]
    assert (claims["sub"], claims["aud"], claims["drun_artifacts"]) == ("loader", "drun", [art]), claims
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 120

    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), jwks=str(tmp_path / "jwks.json"),
                         allow_token_only=True) as srv:
        peer = f"127.0.0.1:{srv.port}"
        got = drun.fetch(store=leecher(tmp_path, "l1"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                         token=token, ca_cert=str(pki.ca), out=str(tmp_path / "out"))
        assert got == art and tree_digests(tmp_path / "out") == tree_digests(root)

        elsewhere = drun.issue_token(str(publisher.key), subject="loader", audience="elsewhere", artifacts=["*"])
        with pytest.raises(drun.AuthorizationError, match="audience") as info:
            drun.fetch(store=leecher(tmp_path, "l2"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       token=elsewhere, ca_cert=str(pki.ca))
        assert info.value.code == "permission_denied"
        assert elsewhere not in str(info.value), "a token must never appear in a message"
        narrow = drun.issue_token(str(publisher.key), subject="loader", audience="drun", artifacts=["0" * 64])
        with pytest.raises(drun.AuthorizationError, match="drun_artifacts"):
            drun.fetch(store=leecher(tmp_path, "l3"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       token=narrow, ca_cert=str(pki.ca))
        with pytest.raises(drun.AuthorizationError, match="no certificate and no token"):
            drun.fetch(store=leecher(tmp_path, "l4"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       ca_cert=str(pki.ca))
        forger = Publisher(drun, tmp_path / "forger")
        forged = drun.issue_token(str(forger.key), subject="loader", audience="drun", artifacts=[art])
        with pytest.raises(drun.AuthorizationError, match="token refused"):
            drun.fetch(store=leecher(tmp_path, "l5"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       token=forged, ca_cert=str(pki.ca))
        assert srv.stats()["pieces_served"] == 7


def test_bound_tokens_through_the_binding(tmp_path, seed, small, publisher, pki):
    """issue_token(bind_cert=...) binds to the holder's certificate; PeerServer's
    require_bound_tokens and token_issuer refuse bearer tokens and other issuers."""
    root, sig, art, _ = small
    cert, key = pki.issue("seed")
    holder = pki.issue("holder", uri="spiffe://cluster/ns/ml/sa/holder")
    thief = pki.issue("thief", uri="spiffe://cluster/ns/ml/sa/thief")
    (tmp_path / "jwks.json").write_text(drun.jwks_for(str(publisher.pub)))
    bound = drun.issue_token(str(publisher.key), subject="loader", audience="drun", artifacts=[art],
                             bind_cert=str(holder[0]))
    claims = json.loads(base64.urlsafe_b64decode(bound.split(".")[1] + "=" * (-len(bound.split(".")[1]) % 4)))
    assert set(claims["cnf"]) == {"x5t#S256"} and len(claims["cnf"]["x5t#S256"]) == 43, claims
    bearer = drun.issue_token(str(publisher.key), subject="loader", audience="drun", artifacts=[art])
    assert "cnf" not in bearer.split(".")[1]  # a plain payload check: no binding asked, none made
    with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), jwks=str(tmp_path / "jwks.json"),
                         require_bound_tokens=True, token_issuer="drun") as srv:
        peer = f"127.0.0.1:{srv.port}"
        got = drun.fetch(store=leecher(tmp_path, "l1"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                         token=bound, tls_cert=str(holder[0]), tls_key=str(holder[1]), ca_cert=str(pki.ca))
        assert got == art
        with pytest.raises(drun.AuthorizationError, match="bound to another certificate") as info:
            drun.fetch(store=leecher(tmp_path, "l2"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       token=bound, tls_cert=str(thief[0]), tls_key=str(thief[1]), ca_cert=str(pki.ca))
        assert bound not in str(info.value)
        with pytest.raises(drun.AuthorizationError, match="not bound to a certificate"):
            drun.fetch(store=leecher(tmp_path, "l3"), artifact=art, public_key=str(publisher.pub), peers=[peer],
                       token=bearer, tls_cert=str(holder[0]), tls_key=str(holder[1]), ca_cert=str(pki.ca))
    with pytest.raises(drun.ConfigError, match="no PEM certificate"):
        drun.issue_token(str(publisher.key), subject="x", audience="drun", artifacts=["*"], bind_cert=str(holder[1]))


def test_token_and_peer_configuration_errors(tmp_path, seed, publisher, pki):
    with pytest.raises(drun.ConfigError, match="0644"):  # a public key is no signing key
        drun.issue_token(str(publisher.pub), subject="x", audience="drun", artifacts=["*"])
    with pytest.raises(drun.ConfigError) as info:
        drun.issue_token(str(tmp_path / "absent"), subject="x", audience="drun", artifacts=["*"])
    assert info.value.code == "not_found"
    with pytest.raises(drun.ConfigError) as info:
        drun.jwks_for(str(tmp_path / "absent.pub"))
    assert info.value.code == "not_found"
    cert, key = pki.issue("seed")
    with pytest.raises(drun.ConfigError, match="certificate"):
        drun.PeerServer(seed, cert=str(tmp_path / "absent.pem"), key=str(key), client_ca=str(pki.ca))
    with pytest.raises(drun.ConfigError, match="HOST:PORT"):
        drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), listen="127.0.0.1:99999")
    with pytest.raises(drun.ConfigError, match="ca-cert"):  # peers are authenticated, always
        drun.fetch(store=seed, artifact="0" * 64, public_key=str(publisher.pub), peers=["127.0.0.1:9"])


@pytest.mark.parametrize("what", ["missing policy file", "malformed policy", "missing jwks file"])
def test_a_bad_policy_or_jwks_file_is_a_configuration_error(tmp_path, seed, pki, what):
    cert, key = pki.issue("seed")
    bad = tmp_path / "bad.json"
    if what == "malformed policy":
        bad.write_text('{"roles": {}, "bindings": [], "typo": 1}')
    kwargs = {"jwks": str(bad)} if "jwks" in what else {"policy": str(bad)}
    with pytest.raises(drun.Error) as info:
        drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca), **kwargs)
    assert info.value.path == str(bad), (info.value.path, str(info.value))
    assert type(info.value) is drun.ConfigError, \
        f"{what}: raised {type(info.value).__name__}({str(info.value)!r}, code {info.value.code!r})"


# ------------------------------------------------------------------------------------------------
# load_safetensors


F32 = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5) / 7
F16 = np.array([1.5, -2.25, 65504, 0, np.inf], dtype=np.float16)
I64 = np.array([[-(2 ** 62), 5], [7, 2 ** 40]], dtype=np.int64)
U8 = np.arange(7, dtype=np.uint8)
BOOL = np.array([True, False, True])
BF16_VALUES = [1.0, -2.5, 0.15625, 3.0 * 2 ** 100]  # exactly representable in bfloat16
I32 = np.array([-1, 2 ** 31 - 1], dtype=np.int32)
F64 = np.array([np.pi, -0.0])
EXPECTED = {"f32": F32, "f16": F16, "i64": I64, "u8": U8, "bool": BOOL, "bf16": bf16_bits(BF16_VALUES), "i32": I32,
            "f64": F64, "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, dtype=np.float32)}


def tensors_file():
    # Ordered so that every tensor is aligned for its dtype (a loader may rely on it; drun's header
    # checks do not require it: see the unaligned test).
    order = ["f64", "i64", "f32", "i32", "scalar", "empty", "f16", "bf16", "u8", "bool"]
    return safetensors_bytes({n: tensor(EXPECTED[n], "BF16" if n == "bf16" else None) for n in order},
                             metadata={"format": "pt", "source": "drun tests"})


HOSTILE = {
    "length past the end": raw_safetensors({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x",
                                           length=4096),
    "length of 2^63": raw_safetensors({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x",
                                      length=2 ** 63 + 5),
    "shorter than the prefix": b"\x05\x00\x00",
    "overlapping offsets": raw_safetensors({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"x" * 6),
    "unknown dtype": raw_safetensors({"a": {"dtype": "F8_E9M9", "shape": [4], "data_offsets": [0, 4]}}, b"x" * 4),
    "shape mismatch": raw_safetensors({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"x" * 20),
    "shape overflow": raw_safetensors({"a": {"dtype": "F64", "shape": [2 ** 32, 2 ** 32, 16],
                                             "data_offsets": [0, 8]}}, b"x" * 8),
    "negative dimension": raw_safetensors({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"x"),
    "offsets past the data": raw_safetensors({"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]}}, b"x" * 4),
    "reversed offsets": raw_safetensors({"a": {"dtype": "U8", "shape": [0], "data_offsets": [3, 0]}}, b"xxx"),
    "gap between tensors": raw_safetensors({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                            "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"x" * 6),
    "not JSON": raw_safetensors(b"{not json", b""),
    "not an object": raw_safetensors(b"[1, 2]", b""),
    "duplicate key": raw_safetensors(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                                     b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x"),
    "metadata not strings": raw_safetensors({"__metadata__": {"n": 1},
                                             "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
    "deeply nested": raw_safetensors(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", b""),
}


@pytest.fixture(scope="module")
def tensors_store(tmp_path_factory, publisher):
    """One artifact holding the well-formed file, an unaligned one and every hostile one, in a store."""
    d = tmp_path_factory.mktemp("tensors")
    files = {"model.safetensors": tensors_file(), "notes.txt": b"not a safetensors file at all",
             "unaligned.safetensors": safetensors_bytes({"u8": tensor(U8[:3]), "f32": tensor(F32),
                                                         "i64": tensor(I64)})}
    files.update({f"hostile/{name.replace(' ', '_')}.safetensors": data for name, data in HOSTILE.items()})
    root, sig, art = publisher.model(d / "m", files, piece_size=4096)
    store = drun.Store(str(d / "store"), key_source=write_node_key(d / "node.key"))
    store.import_model(str(root), signature=str(sig), public_key=str(publisher.pub))
    return store, art


def test_load_safetensors_numpy_dtypes_and_values(tensors_store):
    store, art = tensors_store
    got = drun.load_safetensors(store, art, "model.safetensors")
    assert set(got) == set(EXPECTED)
    for name, want in EXPECTED.items():
        a = got[name]
        assert isinstance(a, np.ndarray), name
        assert a.shape == want.shape and a.dtype == want.dtype, (name, a.shape, a.dtype, want.shape, want.dtype)
        assert a.tobytes() == want.tobytes(), name
    assert got["bf16"].dtype == np.uint16  # numpy has no bfloat16: the raw bits
    assert ((got["bf16"].astype(np.uint32) << 16).view(np.float32) == np.float32(BF16_VALUES)).all()
    assert drun.metadata(store, art, "model.safetensors") == {"format": "pt", "source": "drun tests"}
    assert drun.metadata(store, art, "unaligned.safetensors") in (None, {})


def test_load_safetensors_decrypts_into_one_buffer_without_copies(tensors_store):
    store, art = tensors_store
    got = drun.load_safetensors(store, art, "model.safetensors")
    assert len({id(_root_base(a)) for a in got.values()}) == 1, "the arrays are not views of one buffer"
    assert not any(a.flags.owndata for a in got.values())
    # Addresses follow the file's layout: each tensor sits at its offset in the data section.
    start = got["f64"].ctypes.data
    assert got["i64"].ctypes.data - start == EXPECTED["f64"].nbytes
    assert got["f32"].ctypes.data - start == EXPECTED["f64"].nbytes + EXPECTED["i64"].nbytes


def _root_base(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def test_load_safetensors_torch_with_real_bfloat16(tensors_store):
    torch = pytest.importorskip("torch")
    store, art = tensors_store
    got = drun.load_safetensors(store, art, "model.safetensors", framework="torch")
    dtypes = {"f32": torch.float32, "f16": torch.float16, "i64": torch.int64, "u8": torch.uint8, "bool": torch.bool,
              "bf16": torch.bfloat16, "i32": torch.int32, "f64": torch.float64, "empty": torch.float32,
              "scalar": torch.float32}
    for name, want in EXPECTED.items():
        t = got[name]
        assert isinstance(t, torch.Tensor) and t.dtype == dtypes[name] and tuple(t.shape) == want.shape, name
        if name != "bf16":
            assert torch.equal(t, torch.from_numpy(np.array(want))), name
    assert got["bf16"].float().tolist() == BF16_VALUES
    assert got["f32"].data_ptr() - got["f64"].data_ptr() == EXPECTED["f64"].nbytes + EXPECTED["i64"].nbytes


def test_load_safetensors_unaligned_tensors(tensors_store):
    store, art = tensors_store
    got = drun.load_safetensors(store, art, "unaligned.safetensors")
    assert (got["u8"] == U8[:3]).all() and (got["f32"] == F32).all() and (got["i64"] == I64).all()
    torch = pytest.importorskip("torch")
    got = drun.load_safetensors(store, art, "unaligned.safetensors", framework="torch")
    assert torch.equal(got["f32"], torch.from_numpy(F32)) and torch.equal(got["i64"], torch.from_numpy(I64))


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_a_hostile_header_raises_verification_error(tensors_store, name, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    store, art = tensors_store
    file = f"hostile/{name.replace(' ', '_')}.safetensors"
    with pytest.raises(drun.VerificationError, match="safetensors header") as info:
        drun.load_safetensors(store, art, file, framework=framework)
    assert (info.value.code, info.value.path) == ("malformed_bundle", file), (info.value.code, info.value.path)
    with pytest.raises(drun.VerificationError):
        drun.metadata(store, art, file)


def test_load_safetensors_argument_errors(tensors_store):
    store, art = tensors_store
    with pytest.raises(drun.ConfigError, match="framework") as info:
        drun.load_safetensors(store, art, "model.safetensors", framework="jax")
    assert info.value.code == "invalid_argument"
    with pytest.raises(drun.VerificationError):  # a file that is not safetensors at all
        drun.load_safetensors(store, art, "notes.txt")
    with pytest.raises(drun.ConfigError, match="no artifact"):
        drun.load_safetensors(store, "0" * 64, "model.safetensors")


def test_safetensors_read_refuses_strided_buffers(tensors_store):
    """A strided view spans more memory than its bytes: writing len * itemsize bytes from its start
    would run past the array (security review, finding 7). Refused, and the array is untouched
    (Store.read's own check: test_store_read_argument_errors)."""
    store, art = tensors_store
    size = drun._safetensors_layout(store, art, "model.safetensors")[0]
    whole = np.zeros(2 * size, dtype=np.uint8)
    strided = whole[::2]
    assert strided.nbytes == size and not strided.flags.c_contiguous
    with pytest.raises(drun.ConfigError, match="not C-contiguous") as info:
        drun._safetensors_read(store, art, "model.safetensors", strided)
    assert info.value.code == "invalid_argument"
    assert not whole.any()
    with pytest.raises(drun.ConfigError, match="read-only"):
        drun._safetensors_read(store, art, "model.safetensors", bytes(size))
    drun._safetensors_read(store, art, "model.safetensors", np.empty(size, dtype=np.uint8))  # contiguous: fine


# ------------------------------------------------------------------------------------------------
# the .pyi stubs against the compiled module


def stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_top_level(tree):
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
    return names


def stub_params(fn):
    """(positional names, keyword-only names, names with defaults) of a stub def, without self."""
    a = fn.args
    positional = [x.arg for x in a.posonlyargs + a.args]
    with_defaults = set(positional[len(positional) - len(a.defaults):]) if a.defaults else set()
    with_defaults |= {x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
    if positional and positional[0] == "self":
        positional = positional[1:]
    return positional, [x.arg for x in a.kwonlyargs], with_defaults


def module_params(obj):
    """The same, from a pybind11 docstring's first line ("name(a: T, *, b: T = 0) -> R") or inspect."""
    import inspect
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    if doc and "(" in doc[0] and not hasattr(obj, "__code__"):
        fn = ast.parse(f"def {doc[0].split('(', 1)[0].split('.')[-1]}({doc[0].split('(', 1)[1]}: pass").body[0]
        return stub_params(fn)
    sig = inspect.signature(obj)
    positional = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwonly = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
    defaults = {p.name for p in sig.parameters.values() if p.default is not p.empty}
    if positional and positional[0] == "self":
        positional = positional[1:]
    return positional, kwonly, defaults


def test_every_public_name_is_in_the_stub_and_every_stub_name_is_public():
    top = stub_top_level(stub_tree())
    assert sorted(set(drun.__all__) - set(top)) == [], "in drun.__all__ but not in __init__.pyi"
    assert sorted(set(top) - set(drun.__all__)) == [], "in __init__.pyi but not in drun.__all__"
    for name in drun.__all__:
        assert hasattr(drun, name), f"drun.__all__ names {name}, which drun does not define"
    public = {n for n in vars(drun) if not n.startswith("_") and callable(getattr(drun, n)) and
              getattr(getattr(drun, n), "__module__", "").startswith("drun")}
    assert sorted(public - set(drun.__all__)) == [], "public callables of drun missing from __all__"


@pytest.mark.parametrize("cls", ["Store", "PeerServer", "VerifiedManifest"])
def test_stub_classes_match_the_compiled_classes(cls):
    node = stub_top_level(stub_tree())[cls]
    in_stub = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    compiled = getattr(drun, cls)
    in_module = {n for n in vars(compiled) if not n.startswith("_") or n in ("__enter__", "__exit__")}
    assert sorted(in_module - in_stub) == [], f"drun.{cls} members missing from the stub"
    assert sorted(in_stub - in_module - {"__init__"}) == [], f"stub members of {cls} the module lacks"
    props = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and
             any(isinstance(d, ast.Name) and d.id == "property" for d in n.decorator_list)}
    assert props == {n for n in in_module if isinstance(vars(compiled)[n], property)}, "properties differ"
    for fn in node.body:
        if isinstance(fn, ast.FunctionDef) and fn.name not in props and fn.name not in ("__enter__", "__exit__"):
            assert stub_params(fn) == module_params(getattr(compiled, fn.name)), f"{cls}.{fn.name} parameters"


def test_stub_functions_match_the_module_signatures():
    for name, node in stub_top_level(stub_tree()).items():
        if isinstance(node, ast.FunctionDef):
            assert hasattr(drun, name), f"the stub declares drun.{name}, which does not exist"
            assert stub_params(node) == module_params(getattr(drun, name)), f"drun.{name} parameters"


def test_the_error_hierarchy_matches_the_stub():
    top = stub_top_level(stub_tree())
    for name in ("VerificationError", "AuthorizationError", "SourceError", "StoreError", "ConfigError"):
        bases = [b.id for b in top[name].bases]
        assert bases == ["Error"] and issubclass(getattr(drun, name), drun.Error), name
    assert issubclass(drun.Error, Exception)
    e = drun.ConfigError("msg", "invalid_argument", "p", (1, 2), "src")
    assert (str(e), e.code, e.path, e.range, e.source) == ("msg", "invalid_argument", "p", (1, 2), "src")


def test_the_built_package_carries_the_current_stub():
    built = Path(drun.__file__).with_name("__init__.pyi")
    assert built.is_file(), f"{built} is missing: the package would ship without type information"
    assert built.read_text() == STUB.read_text(), f"{built} differs from {STUB}: rebuild"
    assert Path(drun.__file__).with_name("py.typed").is_file()


# ------------------------------------------------------------------------------------------------
# Sigstore keyless trust (bundles from the test Sigstore instance, tests/python/sigstore_ref.py)

@pytest.fixture
def keyless(tmp_path, small):
    import oms_ref
    import sigstore_ref
    root, _, _, _ = small
    inst = sigstore_ref.Instance(tmp_path / "sigstore")
    trusted_root = tmp_path / "trusted_root.json"
    inst.write_trusted_root(trusted_root)
    payload = oms_ref.serialize_payload(oms_ref.build_statement(root, method="shards", shard_size=P))
    sig = tmp_path / "keyless.sig"
    sigstore_ref.write_json(inst.sign(payload), sig)
    return root, sig, trusted_root, sigstore_ref.DEFAULT_IDENTITY, sigstore_ref.DEFAULT_ISSUER


def test_verify_and_import_keyless(store, keyless, publisher):
    root, sig, trusted_root, identity, issuer = keyless
    trust = dict(trusted_root=str(trusted_root), identity=identity, identity_provider=issuer)
    vm = drun.verify(str(root), signature=str(sig), **trust)
    assert vm.signer == {"method": "sigstore", "key_hint": "", "subject": identity, "issuer": issuer}
    art = store.import_model(str(root), signature=str(sig), **trust)
    assert art == vm.artifact_id and [a["id"] for a in store.list()] == [art]
    with pytest.raises(drun.VerificationError, match="at identity") as info:
        drun.verify(str(root), signature=str(sig), **dict(trust, identity="mallory@example.com"))
    assert info.value.code == "untrusted_certificate"
    with pytest.raises(drun.VerificationError, match="--trusted-root"):
        store.import_model(str(root), signature=str(sig), public_key=str(publisher.pub))


def test_keyless_configuration_errors(tmp_path, keyless):
    root, sig, trusted_root, identity, issuer = keyless
    with pytest.raises(drun.ConfigError, match="identity= and identity_provider="):
        drun.verify(str(root), signature=str(sig), trusted_root=str(trusted_root), identity=identity)
    with pytest.raises(drun.ConfigError, match="go with trusted_root="):
        drun.verify(str(root), signature=str(sig), ca_bundle=str(trusted_root), identity=identity)
    bad = tmp_path / "bad_root.json"
    bad.write_text('{"mediaType": "application/json"}')
    with pytest.raises(drun.ConfigError, match="TrustedRoot") as info:
        drun.verify(str(root), signature=str(sig), trusted_root=str(bad), identity=identity,
                    identity_provider=issuer)
    assert info.value.code == "key_error"


def test_fetch_keyless_from_nginx(tmp_path, store, keyless, origin):
    root, sig, trusted_root, identity, issuer = keyless
    art = drun.fetch(store=store, signature=str(sig), trusted_root=str(trusted_root), identity=identity,
                     identity_provider=issuer, origins=[origin.url()], out=str(tmp_path / "out"))
    assert tree_digests(tmp_path / "out") == tree_digests(root) and len(art) == 64


# ------------------------------------------------------------------------------------------------
# logs, traces and the audit log from Python

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _json_log(err):
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_json_logs_and_the_trace_of_a_fetch_and_of_the_server_that_answered(tmp_path, seed, small, publisher, pki,
                                                                           capfd):
    root, sig, art, files = small
    cert, key = pki.issue("seed")
    ccert, ckey = pki.issue("loader")
    capfd.readouterr()
    drun.configure_logging(level="info", format="json", service_name="trainer")
    try:
        with drun.PeerServer(seed, cert=str(cert), key=str(key), client_ca=str(pki.ca)) as srv:
            drun.fetch(store=leecher(tmp_path, "l"), artifact=art, public_key=str(publisher.pub),
                       peers=[f"127.0.0.1:{srv.port}"], tls_cert=str(ccert), tls_key=str(ckey), ca_cert=str(pki.ca),
                       traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01")
        with pytest.raises(drun.ConfigError, match="traceparent"):
            drun.fetch(store=leecher(tmp_path, "m"), artifact=art, public_key=str(publisher.pub),
                       peers=[f"127.0.0.1:{srv.port}"], traceparent="00-nope")
    finally:
        drun.configure_logging()
    lines = _json_log(capfd.readouterr().err)
    done = [r for r in lines if r["body"] == "fetch completed"]
    closed = [r for r in lines if r["body"] == "connection closed" and r.get("trace_id") == TRACE_ID]
    assert len(done) == 1 and done[0]["trace_id"] == TRACE_ID, lines
    assert done[0]["resource"]["service.name"] == "trainer"
    assert closed and sum(r["attributes"]["pieces"] for r in closed) == 7
    with pytest.raises(drun.ConfigError, match="level"):
        drun.configure_logging(level="loud")


def test_the_audit_log_from_python_records_decisions_and_verifies(tmp_path, small, publisher, store):
    root, sig, art, files = small
    drun.keygen("ed25519", str(tmp_path / "audit.key"))
    pub = str(tmp_path / "audit.key.pub")
    log = drun.AuditLog(str(tmp_path / "a.log"), key=str(tmp_path / "audit.key"), checkpoint_every=3)
    drun.set_audit_log(log)
    try:
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
        store.import_model(str(root), signature=str(sig), public_key=str(publisher.pub))
        log.append("model.loaded", {"artifact": art, "worker": 3, "warm": True, "seconds": 1.5})
    finally:
        drun.set_audit_log(None)
    log.close()
    with pytest.raises(drun.Error, match="closed"):
        log.append("late", {})
    records = [json.loads(x) for x in (tmp_path / "a.log").read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[:2] == ["bundle.verified", "bundle.verified"] and "store.imported" in kinds, kinds
    assert kinds[-1] == "checkpoint"
    mine = next(r for r in records if r["event"] == "model.loaded")["data"]
    assert mine == {"artifact": art, "worker": 3, "warm": "true", "seconds": 1.5}
    rep = drun.audit_verify(str(tmp_path / "a.log"), pub)
    assert rep["records"] == len(records) and rep["checkpoints"] >= 2 and rep["torn_lines"] == []
    text = (tmp_path / "a.log").read_text()
    (tmp_path / "a.log").write_text(text.replace('"worker":3', '"worker":4'))
    with pytest.raises(drun.VerificationError, match="edited"):
        drun.audit_verify(str(tmp_path / "a.log"), pub)
    with pytest.raises(drun.ConfigError, match="Ed25519"):
        drun.keygen("ecdsa-p256", str(tmp_path / "ec.key"))
        drun.AuditLog(str(tmp_path / "b.log"), key=str(tmp_path / "ec.key"))


APPENDER = """
import sys, drun
log = drun.AuditLog(sys.argv[1], key=sys.argv[2], checkpoint_every=int(sys.argv[4]))
for n in range(int(sys.argv[5])):
    log.append("test.record", {"writer": sys.argv[3], "n": n, "pad": "x" * (n % 7) * 1000})
    print(n, flush=True)
log.close()
"""


def _appender(tmp_path, log, writer, every=7, count=10**9):
    import subprocess
    import sys
    # The script goes on the command line: rewriting one script file for each writer let a writer that
    # was still starting read it truncated, run nothing and exit 0 (a CI failure).
    env = dict(os.environ, PYTHONPATH=binding_pythonpath())
    return subprocess.Popen([sys.executable, "-c", APPENDER, str(log), str(tmp_path / "audit.key"), writer, str(every),
                             str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _written(log):
    """{(writer, n)} of the log's complete records."""
    out = set()
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a torn line
        if r["event"] == "test.record":
            out.add((r["data"]["writer"], r["data"]["n"]))
    return out


def test_sigkill_during_appends_never_loses_a_confirmed_record(tmp_path):
    import random
    import signal
    drun.keygen("ed25519", str(tmp_path / "audit.key"))
    pub = str(tmp_path / "audit.key.pub")
    log = tmp_path / "killed.log"
    confirmed = set()
    rng = random.Random(7)
    for round_ in range(10):
        procs = [_appender(tmp_path, log, f"w{round_}.{k}") for k in range(2)]
        # Kill them mid-appends, not while Python still starts (seconds on a loaded machine): once
        # both have written, after a random while.
        started = time.monotonic()
        while not {f"w{round_}.{k}" for k in range(2)} <= {w for w, _ in (_written(log) if log.exists() else ())}:
            assert time.monotonic() - started < 60, "the appenders wrote nothing in 60 s"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        time.sleep(rng.random() * 0.4)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for k, p in enumerate(procs):
            out, err = p.communicate(timeout=20)
            assert p.returncode == -signal.SIGKILL, err
            confirmed |= {(f"w{round_}.{k}", int(n)) for n in out.split()}
        # After every kill: the log verifies, and holds every record a writer was told was written.
        # (A kill lands between write() calls: each record is one, so torn lines are rare here; the
        # CLI tests make one by hand.)
        drun.audit_verify(str(log), pub)
        missing = confirmed - _written(log)
        assert not missing, sorted(missing)[:5]
    assert len(confirmed) > 100


def test_concurrent_appenders_in_several_processes(tmp_path):
    drun.keygen("ed25519", str(tmp_path / "audit.key"))
    log = tmp_path / "shared.log"
    procs = [_appender(tmp_path, log, f"p{k}", every=25, count=150) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rep = drun.audit_verify(str(log), str(tmp_path / "audit.key.pub"))
    assert _written(log) == {(f"p{k}", n) for k in range(4) for n in range(150)}
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert rep["records"] == len(records) and rep["torn_lines"] == [] and rep["unsealed"] == 0
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    # Each writer's records are in its own order.
    for k in range(4):
        ns = [r["data"]["n"] for r in records if r["event"] == "test.record" and r["data"]["writer"] == f"p{k}"]
        assert ns == list(range(150))


def test_a_blake3_model_signs_verifies_imports_and_loads(tmp_path, publisher, store):
    arr = np.arange(70000, dtype=np.float32)
    files = {"model.safetensors": safetensors_bytes({"w": tensor(arr)}), "config.json": b"{}"}
    root, sig, art = publisher.model(tmp_path / "b3", files, piece_size=P, hash="blake3")
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["serialization"]["hash_type"] == "blake3"
    got = store.import_model(str(root), signature=str(sig), public_key=str(publisher.pub))
    assert got == art
    loaded = drun.load_safetensors(store, art, "model.safetensors")
    assert np.array_equal(loaded["w"], arr)
    flip_byte(root / "model.safetensors", 1000)
    with pytest.raises(drun.VerificationError, match="blake3 digest mismatch"):
        drun.verify(str(root), signature=str(sig), public_key=str(publisher.pub))
