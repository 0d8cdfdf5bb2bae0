"""drun encrypted piece store (`drun cache ...`): CLI contract tests.

Node keys, import -> ls/show -> export round trips, no plaintext at rest, corruption and piece swaps,
tampered models, SIGKILL during import and during key rotation, a full disk, gc/pin/rm, files-mode bundles.

Exit statuses: 0 ok, 1 integrity failure, 2 usage/configuration (bad key, bad args), 3 I/O (ENOSPC).
Every test needs DRUN_BIN. The whole module skips while the binary has no `cache` command; any other
problem is a failure.
"""

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PIECE, Result, det_bytes, flip_byte, make_model

MiB = 1 << 20
IMPORTED_RE = re.compile(r"^imported ([0-9a-f]{64})\b")
ALREADY_RE = re.compile(r"\((\d+) already stored\)")
LS_KEYS = {"id", "subject", "bytes", "pieces", "stored_pieces", "pinned", "last_access"}
WRONG_KEY = ("wrong key", "retired")

# A few MiB with many 64 KiB pieces; distinct sizes; the last piece of each file is short.
STORE_FILES = {
    "config.json": b'{"architectures": ["TinyModel"], "hidden_size": 64}\n',
    "model-00001.safetensors": 2 * MiB + 1000,     # 33 pieces
    "model-00002.safetensors": 1 * MiB + 4321,     # 17 pieces
    "tokenizer/vocab.txt": b"".join(b"token%d\n" % i for i in range(9000)),
}
BIG_FILES = {"big-a.bin": 5 * MiB + 123, "big-b.bin": 3 * MiB - 77}  # ~8 MiB, 81 + 48 pieces
SMALL_FILES = {"w.bin": 300_000, "c.json": b'{"n": 1}\n'}


# ------------------------------------------------------------------------------------------------
# the module runs only once drun has a `cache` command


@pytest.fixture(scope="module", autouse=True)
def _cache_command_exists(drun_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_probe")
    env = dict(os.environ)
    env.pop("DRUN_STORE_PROBE_UNSET", None)
    p = subprocess.run([drun_bin, "cache", "ls", "--store", str(d / "store"), "--key-source",
                        "env:DRUN_STORE_PROBE_UNSET"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=60, env=env)
    if p.returncode == 2 and b"unknown command" in p.stderr.lower():
        pytest.skip(f"{drun_bin} has no `cache` command yet (the encrypted piece store is not built in)")


# ------------------------------------------------------------------------------------------------
# helpers


def write_node_key(path, raw=None, fmt="hex", mode=0o600):
    """Write a node key file (hex or base64 of `raw`, trailing newline); returns the raw 32 bytes."""
    raw = os.urandom(32) if raw is None else raw
    text = raw.hex() if fmt == "hex" else base64.b64encode(raw).decode()
    Path(path).write_text(text + "\n")
    os.chmod(path, mode)
    return raw


def sign_model(drun, drun_keys, root, method="shards"):
    key, pub = drun_keys["ecdsa-p256"]
    args = ["sign", root, "--key", key, "--method", method]
    if method == "shards":
        args += ["--piece-size", PIECE]
    drun(*args).ok()
    return pub


def tree_digests(root):
    """{relative path: sha256} of every regular file under root (a top-level model.sig excluded)."""
    root = Path(root)
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rel == "model.sig":
            continue
        if p.is_symlink() or not p.is_dir():
            assert p.is_file() and not p.is_symlink(), f"{p} is not a regular file"
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def all_paths(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))


def pieces_of(size):
    return (size + PIECE - 1) // PIECE


def model_layout(drun, root):
    """Manifest order [(name, size, pieces)] of a signed model (FILE_INDEX order in the store)."""
    j = json.loads(drun("manifest", Path(root) / "model.sig", "--json").ok().out)
    return [(f["name"], f["size"], f["pieces"]) for f in j["files"]]


def total_pieces(root):
    return sum(pieces_of(p.stat().st_size) for p in Path(root).rglob("*")
               if p.is_file() and p.name != "model.sig")


def already_stored(result):
    m = ALREADY_RE.findall(result.out)
    return int(m[-1]) if m else 0


class Store:
    def __init__(self, drun, drun_bin, directory, key_file):
        self.drun, self.bin, self.dir, self.key = drun, drun_bin, Path(directory), Path(key_file)

    @property
    def ks(self):
        return f"file:{self.key}"

    def argv(self, sub, *args, key_source=None):
        return [self.bin, "cache", sub, *map(str, args), "--store", str(self.dir), "--key-source",
                key_source or self.ks]

    def __call__(self, sub, *args, key_source=None, timeout=120):
        return self.drun("cache", sub, *args, "--store", self.dir, "--key-source", key_source or self.ks,
                         timeout=timeout)

    def import_(self, model, pub, *extra, key_source=None):
        model = Path(model)
        return self("import", model, "--signature", model / "model.sig", "--public-key", pub, *extra,
                    key_source=key_source)

    def imported(self, model, pub, *extra):
        """Import that must succeed; returns (artifact id, Result)."""
        r = self.import_(model, pub, *extra).ok()
        lines = r.out.strip().splitlines()
        assert lines, f"import printed nothing{r!r}"
        m = IMPORTED_RE.match(lines[-1].strip())
        assert m, f"stdout must end with 'imported <64 hex id> ...'{r!r}"
        return m.group(1), r

    def ls(self, key_source=None):
        r = self("ls", "--json", key_source=key_source).ok()
        j = json.loads(r.out)
        assert isinstance(j, list), f"ls --json must print a list{r!r}"
        return j

    def ls_by_id(self):
        return {a["id"]: a for a in self.ls()}

    def show(self, art, key_source=None):
        return json.loads(self("show", art, "--json", key_source=key_source).ok().out)

    def stored(self, art):
        return sum(f["stored_pieces"] for f in self.show(art)["files"])

    def artifact_dir(self, art):
        return self.dir / "artifacts" / art

    def data_file(self, drun, model, art, name):
        """DIR/artifacts/<id>/data/<FILE_INDEX> of model file `name` (index = manifest order)."""
        layout = model_layout(drun, model)
        idx = [n for n, _, _ in layout].index(name)
        p = self.artifact_dir(art) / "data" / str(idx)
        assert p.is_file(), f"{p} missing; artifact dir holds {all_paths(self.artifact_dir(art))}"
        assert p.stat().st_size == layout[idx][1], f"{p} is not preallocated to {name}'s size {layout[idx][1]}"
        return p

    def export_identical(self, art, dest, model, key_source=None):
        self("export", art, dest, key_source=key_source).ok()
        assert tree_digests(dest) == tree_digests(model), "exported files differ from the model"


@pytest.fixture
def store(drun, drun_bin, tmp_path):
    key = tmp_path / "node.key"
    write_node_key(key)
    return Store(drun, drun_bin, tmp_path / "store", key)


def snapshot_artifacts(store):
    """Bytes of every file under DIR/artifacts (data files and bundles), by relative path."""
    root = store.dir / "artifacts"
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def assert_dest_has_only_complete_files(dest, model, absent):
    """After a failed export: DEST holds only complete, correct model files (no temp files), and not `absent`."""
    want = tree_digests(model)
    if not Path(dest).exists():
        return
    for p in Path(dest).rglob("*"):
        rel = p.relative_to(dest).as_posix()
        if p.is_dir() and not p.is_symlink():
            continue
        assert rel in want, f"export left {rel!r} in DEST (a temporary or unknown file): {all_paths(dest)}"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == want[rel], f"export left a wrong {rel}"
    assert absent not in {p.relative_to(dest).as_posix() for p in Path(dest).rglob("*")}, \
        f"the corrupt file {absent} was left in DEST"


# ------------------------------------------------------------------------------------------------
# 1. node keys and key sources


def test_cache_keygen(drun, drun_bin, tmp_path):
    k = tmp_path / "node.key"
    drun("cache", "keygen", "--out", k).ok()
    text = k.read_text()
    assert re.fullmatch(r"[0-9a-fA-F]{64}\n", text), repr(text)
    assert k.stat().st_mode & 0o777 == 0o600, oct(k.stat().st_mode)
    k2 = tmp_path / "node2.key"
    drun("cache", "keygen", "--out", k2).ok()
    assert k2.read_text() != text, "two keygens made the same key"
    # refuses to overwrite, whether the file is a node key or anything else
    drun("cache", "keygen", "--out", k).fails(2)
    assert k.read_text() == text
    other = tmp_path / "precious"
    other.write_bytes(b"precious")
    drun("cache", "keygen", "--out", other).fails(2)
    assert other.read_bytes() == b"precious"
    # the key it wrote opens a store
    s = Store(drun, drun_bin, tmp_path / "store", k)
    assert s.ls() == []


def test_key_sources(drun, drun_keys, store, tmp_path, monkeypatch):
    m = make_model(tmp_path / "m", SMALL_FILES)
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    raw = bytes.fromhex(store.key.read_text().strip())

    # file: readable by group/others is refused
    for mode in (0o644, 0o640, 0o604):
        loose = tmp_path / f"loose-{mode:o}.key"
        write_node_key(loose, raw, mode=mode)
        store("ls", key_source=f"file:{loose}").fails(2, "permissions")
    # base64 file form is accepted too
    b64file = tmp_path / "b64.key"
    write_node_key(b64file, raw, fmt="base64")
    assert [a["id"] for a in store.ls(key_source=f"file:{b64file}")] == [art]

    # env:
    monkeypatch.delenv("DRUN_TEST_NODE_KEY", raising=False)
    store("ls", key_source="env:DRUN_TEST_NODE_KEY").fails(2, "not set")
    monkeypatch.setenv("DRUN_TEST_NODE_KEY", base64.b64encode(raw).decode())
    assert [a["id"] for a in store.ls(key_source="env:DRUN_TEST_NODE_KEY")] == [art]
    monkeypatch.setenv("DRUN_TEST_NODE_KEY", raw.hex() + "\n")
    assert [a["id"] for a in store.ls(key_source="env:DRUN_TEST_NODE_KEY")] == [art]

    # cmd:
    assert [a["id"] for a in store.ls(key_source=f"cmd:cat {store.key}")] == [art]
    r = store("ls", key_source="cmd:echo nothing-to-see >&2; exit 3").fails(2)
    assert re.search(r"\b3\b", r.err), f"the command's exit status is not named{r!r}"

    # malformed keys: 31 or 33 bytes (hex and base64), not hex/base64 at all, empty
    bad = {
        "hex31": raw[:31].hex(), "hex33": (raw + b"\x00").hex(),
        "b64_31": base64.b64encode(raw[:31]).decode(), "b64_33": base64.b64encode(raw + b"\x01").decode(),
        "junk": "z" * 64, "empty": "",
    }
    for name, value in bad.items():
        monkeypatch.setenv("DRUN_TEST_NODE_KEY", value)
        r = store("ls", key_source="env:DRUN_TEST_NODE_KEY")
        assert r.rc == 2, f"malformed key {name} accepted or wrong status{r!r}"
        r.fails(2)
    # still intact with the right key
    store("verify").ok()


def test_wrong_key_leaves_store_untouched(drun, drun_keys, store, tmp_path):
    m1 = make_model(tmp_path / "m1", STORE_FILES, seed=1)
    m2 = make_model(tmp_path / "m2", SMALL_FILES, seed=2)
    pub = sign_model(drun, drun_keys, m1)
    sign_model(drun, drun_keys, m2)
    art, _ = store.imported(m1, pub)
    before_files = snapshot_artifacts(store)
    before_ls = store("ls", "--json").ok().out

    wrong = tmp_path / "wrong.key"
    write_node_key(wrong)
    newer = tmp_path / "newer.key"
    write_node_key(newer)
    ws = f"file:{wrong}"
    dest = tmp_path / "dest"
    attempts = [
        ("ls",), ("ls", "--json"), ("show", art), ("verify",), ("verify", art), ("export", art, dest),
        ("rm", art), ("pin", art), ("unpin", art), ("gc", "--ttl", "0"), ("gc", "--high", "1", "--low", "0"),
        ("rotate-key", "--new-key-source", f"file:{newer}"),
    ]
    for a in attempts:
        store(*a, key_source=ws).fails(2, "wrong key")
    store.import_(m2, pub, key_source=ws).fails(2, "wrong key")
    assert not dest.exists() or not any(dest.iterdir()), f"export with a wrong key wrote {all_paths(dest)}"

    assert snapshot_artifacts(store) == before_files, "a wrong key changed the store's files"
    assert store("ls", "--json").ok().out == before_ls
    store("verify").ok()
    store.export_identical(art, tmp_path / "out", m1)


# ------------------------------------------------------------------------------------------------
# 2. import -> ls/show -> export


def test_import_ls_show_export(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "tinymodel", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    layout = model_layout(drun, m)
    total = sum(p for _, _, p in layout)
    assert total == total_pieces(m) == 33 + 17 + 1 + 2
    size = sum(s for _, s, _ in layout)

    art, r = store.imported(m, pub, "--threads", 4)
    assert already_stored(r) == 0

    ls = store.ls()
    assert len(ls) == 1, ls
    a = ls[0]
    assert LS_KEYS <= set(a), f"ls --json lacks {LS_KEYS - set(a)}: {a}"
    assert a["id"] == art
    assert (a["pieces"], a["stored_pieces"], a["bytes"], a["pinned"]) == (total, total, size, False), a
    assert m.name in json.dumps(a["subject"]), a
    text = store("ls").ok().out
    assert art[:8] in text and m.name in text, text

    sh = store.show(art[:8])  # unique prefix of 8 hex chars
    assert sh["id"] == art
    assert sh["pinned"] is False
    assert isinstance(sh["key_version"], int)
    got = [(f["name"], f["size"], f["pieces"], f["stored_pieces"]) for f in sh["files"]]
    assert sorted(got) == sorted((n, s, p, p) for n, s, p in layout), got
    assert store.show(art)["id"] == art
    text = store("show", art).ok().out
    assert "model-00001.safetensors" in text

    store("show", "deadbeefdeadbeef").fails(2, "no artifact")
    store("export", "deadbeefdeadbeef", tmp_path / "nope").fails(2, "no artifact")
    assert not (tmp_path / "nope").exists() or not any((tmp_path / "nope").iterdir())

    # export: to a new directory and to an existing empty one
    store.export_identical(art, tmp_path / "out" / "nested", m)
    (tmp_path / "empty").mkdir()
    store.export_identical(art[:12], tmp_path / "empty", m)
    # into a non-empty directory: refused, nothing written
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_bytes(b"keep")
    store("export", art, busy).fails(2)
    assert all_paths(busy) == ["keep.txt"] and (busy / "keep.txt").read_bytes() == b"keep"
    # a DEST that is a regular file
    f = tmp_path / "a-file"
    f.write_bytes(b"x")
    store("export", art, f).fails(2)
    assert f.read_bytes() == b"x"

    # re-import: every piece already stored, nothing rewritten
    before = snapshot_artifacts(store)
    _, r2 = store.imported(m, pub)
    assert already_stored(r2) == total, f"re-import must skip all {total} pieces{r2!r}"
    assert snapshot_artifacts(store) == before, "re-import rewrote stored pieces"
    assert len(store.ls()) == 1
    store("verify").ok()
    store("verify", art[:8]).ok()


def test_import_with_wrong_public_key_stores_nothing(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", SMALL_FILES)
    sign_model(drun, drun_keys, m)
    _, other_pub = drun_keys["ecdsa-p384"]
    store.import_(m, other_pub).fails(1, any_of=("hint", "signature"))
    assert all(a["stored_pieces"] == 0 for a in store.ls()), store.ls()


# ------------------------------------------------------------------------------------------------
# 3. no plaintext at rest


def test_no_plaintext_at_rest(drun, drun_keys, store, tmp_path):
    pattern = os.urandom(65536)
    marker = b"DRUN-PLAINTEXT-MARKER" * 1000
    twin = os.urandom(PIECE)  # the same plaintext in two aligned pieces (4 and 5)
    weights = bytearray(det_bytes(8 * PIECE + 333, 11))
    weights[100_000:100_000 + len(pattern)] = pattern            # unaligned, spans two pieces
    weights[4 * PIECE:5 * PIECE] = twin
    weights[5 * PIECE:6 * PIECE] = twin
    weights[6 * PIECE + 7:6 * PIECE + 7 + len(marker)] = marker
    m = make_model(tmp_path / "m", {
        "weights.bin": bytes(weights),
        "notes.txt": marker + b"\n",
        "config.json": b'{"secret": "' + marker[:200] + b'"}\n',
    })
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    raw_key = bytes.fromhex(store.key.read_text().strip())

    needles = {f"pattern[{o}:{o + 32}]": pattern[o:o + 32] for o in (0, 1, 4093, 30000, 65536 - 32)}
    needles.update({f"twin[{o}:{o + 32}]": twin[o:o + 32] for o in (0, 5000, PIECE - 32)})
    needles["marker"] = b"DRUN-PLAINTEXT-MARKER"
    needles["node key (raw)"] = raw_key
    needles["node key (hex)"] = raw_key.hex().encode()
    needles["node key (base64)"] = base64.b64encode(raw_key)
    files = [p for p in store.dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "index.sqlite" in names, f"store layout: {all_paths(store.dir)}"
    for p in files:
        data = p.read_bytes()
        for what, needle in needles.items():
            assert needle not in data, f"{what} found in {p.relative_to(store.dir)} at offset {data.find(needle)}"

    data = store.data_file(drun, m, art, "weights.bin").read_bytes()
    assert data[4 * PIECE:5 * PIECE] != data[5 * PIECE:6 * PIECE], \
        "identical plaintext pieces have identical ciphertext (nonce reuse?)"
    store.export_identical(art, tmp_path / "out", m)


# ------------------------------------------------------------------------------------------------
# 4. corruption at rest


def test_corrupt_piece_verify_export_and_repair(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    total = total_pieces(m)
    name = "model-00001.safetensors"
    n_file = pieces_of(STORE_FILES[name])
    flip_byte(store.data_file(drun, m, art, name), 3 * PIECE + 77)  # piece 3 of that file

    # the same corrupt store twice: one copy for export, one for verify (verify drops bad pieces)
    twin = Store(store.drun, store.bin, tmp_path / "store-copy", store.key)
    shutil.copytree(store.dir, twin.dir)

    dest = tmp_path / "dest"
    r = twin("export", art, dest).fails(1, name, "piece")
    assert_dest_has_only_complete_files(dest, m, absent=name)

    r = store("verify").fails(1, name)
    assert re.search(r"piece \d+", r.err), f"verify must name 'piece <index>'{r!r}"
    assert "model-00002.safetensors" not in r.err and "vocab.txt" not in r.err, f"only the bad piece{r!r}"
    store("verify", art[:8]).ok()  # the bad piece was dropped: what is stored now is good

    files = {f["name"]: f for f in store.show(art)["files"]}
    assert files[name]["stored_pieces"] == n_file - 1, files[name]
    assert all(f["stored_pieces"] == f["pieces"] for n, f in files.items() if n != name), files
    assert store.ls_by_id()[art]["stored_pieces"] == total - 1

    # an export of the incomplete artifact fails and leaves no trace of that file
    dest2 = tmp_path / "dest2"
    r = store("export", art, dest2)
    assert r.rc != 0, f"export of an artifact with a missing piece succeeded{r!r}"
    assert_dest_has_only_complete_files(dest2, m, absent=name)

    # re-import repairs it
    _, r = store.imported(m, pub)
    k = already_stored(r)
    assert 0 < k < total, f"re-import must skip the stored pieces and rewrite the dropped one{r!r}"
    assert store.stored(art) == total
    store("verify").ok()
    store.export_identical(art, tmp_path / "out", m)


def checkpointed_index(store):
    """The store's index with its WAL folded in (so that damage to the file hits live pages); its bytes."""
    import sqlite3
    c = sqlite3.connect(store.dir / "index.sqlite")
    try:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        c.close()
    return (store.dir / "index.sqlite").read_bytes()


def damaged_index_outcome(store, art, m, pub, tmp_path, write_damage):
    """A store restored from `pristine`, its index damaged by write_damage(path), then exported,
    verified, repaired as the messages say, re-imported and exported again. Returns a label of what
    happened; asserts that no step yields wrong bytes and that the store always ends repaired."""
    dest = tmp_path / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    write_damage(store.dir / "index.sqlite")
    e = store("export", art, dest)
    if e.rc == 0:
        assert tree_digests(dest) == tree_digests(m), f"an export from a damaged index wrote wrong bytes{e!r}"
    else:
        assert e.rc in (1, 2, 3), e
        assert not dest.exists() or not any(dest.iterdir()), f"a failed export left files behind{e!r}"
    v = store("verify")
    if v.rc == 2 and "key" in v.err:
        # A flip in the fingerprint of the store's key is proven wrong by a stored piece and the
        # record rewritten (test_store.cpp); one in the key's state still reads as a key error:
        # the store refuses (fails closed), and the operator moves the index aside by hand.
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store.dir / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
        store.imported(m, pub)
        store.export_identical(art, dest, m)
        return "key state"
    assert v.rc in (0, 1), f"verify of a damaged index must report (exit 1) or find it sound{v!r}"
    if e.rc != 0 and e.rc != 1:
        assert v.rc == 1, f"the export failed on the damaged index but verify found nothing{e!r}{v!r}"
    label = "sound"
    if v.rc == 1:
        assert "index" in v.err or "piece" in v.err, v
        label = ("rebuilt" if "REINDEX" in v.err else "rows reset" if "index entry" in v.err or "file list" in v.err
                 else "piece dropped" if "piece" in v.err else "beyond repair")
        if "--reset-index" in v.err:
            # what the message says to do: the index is set aside, the store starts empty, and the
            # import brings everything back
            label = "beyond repair"
            r = store("verify", "--reset-index").fails(1, "set aside as")
            aside = re.search(r"set aside as (\S+);", r.err).group(1)
            assert Path(aside).is_file() and not (store.dir / "index.sqlite").exists(), r
    elif e.rc == 1:
        label = "piece dropped"  # the export dropped it; verify found the rest sound
    store.imported(m, pub)
    shutil.rmtree(dest, ignore_errors=True)
    store.export_identical(art, dest, m)
    store("verify").ok()
    return label


def test_index_bit_flips_and_torn_pages_are_named_repaired_and_never_yield_wrong_bytes(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    other = make_model(tmp_path / "other", SMALL_FILES)
    sign_model(drun, drun_keys, other)
    store.imported(other, pub)
    older = checkpointed_index(store)  # the index before the second import: the stale half of a torn page
    art, _ = store.imported(m, pub)
    pristine_index = checkpointed_index(store)
    pristine = tmp_path / "pristine"
    shutil.copytree(store.dir, pristine)

    def restored():
        shutil.rmtree(store.dir)
        shutil.copytree(pristine, store.dir)

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    labels = {}
    # Under ASan every drun start costs about a second: a quarter of the flips there (the plain
    # build's run checks the kinds of damage; this one checks the same paths for memory errors).
    sparse = 4 if "ASAN_OPTIONS" in os.environ else 1
    # A bit flip every ~2,000 bytes, from a random start: headers, schema, b-tree pages, rows.
    pos = rng.randrange(2000 * sparse)
    while pos < len(pristine_index):
        restored()
        bit = 1 << rng.randrange(8)

        def flip(path, pos=pos, bit=bit):
            with open(path, "r+b") as f:
                f.seek(pos)
                b = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([b ^ bit]))
        label = damaged_index_outcome(store, art, m, pub, tmp_path, flip)
        labels.setdefault(label, []).append(pos)
        pos += rng.randrange(1400, 2600) * sparse
    # A torn write of every page that changed: its first half new, its second half as it was.
    page = 4096
    torn = 0
    for start in range(0, min(len(older), len(pristine_index)), page):
        if older[start:start + page] == pristine_index[start:start + page]:
            continue
        restored()

        def tear(path, start=start):
            with open(path, "r+b") as f:
                f.seek(start + page // 2)
                f.write(older[start + page // 2:start + page])
        labels.setdefault(damaged_index_outcome(store, art, m, pub, tmp_path, tear), []).append(f"torn {start // page}")
        torn += 1
    msg = f"(seed {seed}: {dict((k, len(v)) for k, v in labels.items())})"
    print(msg)
    assert torn >= 3, msg
    # the kinds of damage this test is for did all come up
    if sparse == 1:
        assert len(labels.get("sound", [])) > 0 and len(labels) >= 3, msg
        assert sum(len(v) for k, v in labels.items() if k != "sound") >= 6, msg


# ------------------------------------------------------------------------------------------------
# 5. pieces moved around


def test_piece_swapped_within_a_file(drun, drun_keys, store, tmp_path):
    # Moves ciphertext only: the tags stay in the index, whose schema the contract leaves open, so this
    # cannot show that a piece's position is bound into its AEAD (moving ciphertext and tag together).
    m = make_model(tmp_path / "m", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    name = "model-00001.safetensors"
    p = store.data_file(drun, m, art, name)
    data = bytearray(p.read_bytes())
    assert data[0:PIECE] != data[PIECE:2 * PIECE]
    data[PIECE:2 * PIECE] = data[0:PIECE]  # piece 0's ciphertext in piece 1's place
    p.write_bytes(bytes(data))
    r = store("verify", art).fails(1, name)
    assert re.search(r"piece \d+", r.err), r
    store("export", art, tmp_path / "dest").fails(1, name)


def test_data_file_copied_between_artifacts(drun, drun_keys, store, tmp_path):
    mx = make_model(tmp_path / "x" / "model", STORE_FILES, seed=1)
    my = make_model(tmp_path / "y" / "model", STORE_FILES, seed=2)  # same layout and sizes, other bytes
    pub = sign_model(drun, drun_keys, mx)
    sign_model(drun, drun_keys, my)
    ax, _ = store.imported(mx, pub)
    ay, _ = store.imported(my, pub)
    assert ax != ay
    name = "model-00002.safetensors"
    px, py = store.data_file(drun, mx, ax, name), store.data_file(drun, my, ay, name)
    assert px.name == py.name
    shutil.copyfile(px, py)
    store("verify", ax).ok()
    store("verify", ay).fails(1, name)
    store("export", ay, tmp_path / "dest").fails(1, name)
    store.export_identical(ax, tmp_path / "out-x", mx)


# ------------------------------------------------------------------------------------------------
# 6. a tampered model at import


def test_tampered_model_at_import_keeps_good_pieces(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    total = total_pieces(m)
    name = "model-00001.safetensors"
    flip_byte(m / name, 2 * PIECE + 5)
    r = store.import_(m, pub).fails(1, name, str(2 * PIECE), str(3 * PIECE))
    assert f"[{PIECE}, {2 * PIECE})" not in r.err, f"only the bad range is reported{r!r}"

    ls = store.ls()
    assert len(ls) == 1, ls
    art = ls[0]["id"]
    assert ls[0]["stored_pieces"] == total - 1, ls
    files = {f["name"]: f for f in store.show(art)["files"]}
    assert files[name]["stored_pieces"] == files[name]["pieces"] - 1
    store("verify").ok()
    store("export", art, tmp_path / "partial").fails((1, 2, 3))
    assert_dest_has_only_complete_files(tmp_path / "partial", m, absent=name)

    flip_byte(m / name, 2 * PIECE + 5)  # restored
    art2, r = store.imported(m, pub)
    assert art2 == art
    assert already_stored(r) == total - 1, r
    store.export_identical(art, tmp_path / "out", m)


# ------------------------------------------------------------------------------------------------
# 7. SIGKILL during import, with a concurrent reader


class Reader(threading.Thread):
    """Runs `cache ls --json` and `cache verify` in a loop; every run must succeed."""

    def __init__(self, store, gate):
        super().__init__(daemon=True)
        self.store, self.gate = store, gate
        self.stop = threading.Event()
        self.failures, self.runs = [], 0

    def run(self):
        while not self.stop.is_set() and len(self.failures) < 5:
            for sub in (["ls", "--json"], ["verify"]):
                with self.gate:
                    argv = self.store.argv(*sub)
                    try:
                        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
                    except subprocess.TimeoutExpired:
                        self.failures.append(f"{' '.join(sub)} did not finish within 60 s")
                        continue
                self.runs += 1
                res = Result(argv[1:], p.returncode, p.stdout.decode(errors="replace"),
                             p.stderr.decode(errors="replace"))
                if p.returncode != 0:
                    self.failures.append(repr(res))
                elif sub[0] == "ls":
                    try:
                        assert isinstance(json.loads(res.out), list)
                    except Exception as e:  # noqa: BLE001
                        self.failures.append(f"ls --json printed no JSON list ({e}){res!r}")


def popen_killed(argv, delay):
    """Start argv and SIGKILL it after `delay` seconds unless it ended first. Result.rc is -9 when killed
    (a process that exits on its own just as the signal is sent keeps its own status)."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    return Result(argv[1:], p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def popen_killed_once(argv, condition, timeout=60):
    """Start argv and SIGKILL it as soon as condition() holds (polled), unless it ended first."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    while p.poll() is None and time.monotonic() - started < timeout:
        if condition():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    out, err = p.communicate(timeout=60)
    return Result(argv[1:], p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def test_sigkill_during_import(drun, drun_bin, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "big", BIG_FILES)
    pub = sign_model(drun, drun_keys, m)
    total = total_pieces(m)
    assert total == 81 + 48
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)

    # how long a whole import takes here, so that the kills land inside one
    cal = Store(drun, drun_bin, tmp_path / "calibration", store.key)
    t0 = time.monotonic()
    cal.imported(m, pub, "--threads", 2)
    t_full = time.monotonic() - t0
    shutil.rmtree(cal.dir)
    max_delay = min(0.150, max(0.005, 1.2 * t_full))

    argv = store.argv("import", m, "--signature", m / "model.sig", "--public-key", pub, "--threads", 2)
    gate = threading.Lock()
    assert store.ls() == []  # the store exists before the reader starts (first open: the next test)
    reader = Reader(store, gate)
    counts = {"killed": 0, "completed": 0}
    unexpected = []

    def attempt(delay=None):
        res = popen_killed(argv, delay) if delay is not None else popen_killed_once(argv, lambda: stored_now() > 0)
        if res.rc == -signal.SIGKILL:
            counts["killed"] += 1
        elif res.rc == 0:
            counts["completed"] += 1
            done = IMPORTED_RE.match((res.out.strip().splitlines() or [""])[-1])
            if not done:
                unexpected.append(f"a successful import must end with 'imported <id>'{res!r}")
                return
            with gate:  # start over so that later kills hit a real import
                store("rm", done.group(1)).ok()
        else:
            unexpected.append(repr(res))

    def stored_now():
        with gate:
            ls = store.ls()
        assert len(ls) <= 1, ls
        return ls[0]["stored_pieces"] if ls else 0

    reader.start()
    try:
        for _ in range(50):
            attempt(rng.uniform(0, max_delay))
            if unexpected or reader.failures:
                break
        # End on a partly stored artifact, so that the final import has something to resume. The
        # kill time is bisected: a kill that left nothing stored came too early, an import that
        # completed too late (on a fast machine a whole import takes 50 ms, most of it start-up).
        # Every other try kills once the store shows a first batch instead: on a loaded machine,
        # where one import's duration is no guide to the next, that is what lands inside one.
        early, late = 0.0, 1.5 * t_full
        for k in range(60):
            now = stored_now()
            if unexpected or reader.failures or 0 < now < total:
                break
            if k % 2:
                attempt()
                continue
            delay = rng.uniform(early, late)
            before = counts["completed"]
            attempt(delay)
            if counts["completed"] > before:
                late = max(delay, early + 0.001)
            elif stored_now() == 0:
                early = min(delay, late - 0.001)
    finally:
        reader.stop.set()
        reader.join(timeout=120)
    msg = f"(seed {seed}, full import {t_full:.3f} s, {counts})"
    assert not unexpected, f"an import after earlier SIGKILLs failed {msg}:\n" + "\n".join(unexpected)
    assert not reader.failures, f"a concurrent reader failed {msg}:\n" + "\n".join(reader.failures)
    assert reader.runs > 0
    assert counts["killed"] >= 10, f"too few imports were killed mid-way {msg}"

    store("verify").ok()
    stored_before = stored_now()
    assert 0 < stored_before < total, f"no killed import left a partly stored artifact {msg}"
    art, r = store.imported(m, pub, "--threads", 2)
    assert already_stored(r) == stored_before, \
        f"the final import must skip exactly the {stored_before} pieces the killed runs stored {msg}{r!r}"
    assert store.stored(art) == total
    store("verify").ok()
    store.export_identical(art, tmp_path / "out", m)


def test_concurrent_first_open_of_a_new_store(drun, drun_bin, tmp_path):
    """Several processes opening one brand-new store at once all succeed (e.g. no "database is locked")."""
    key = tmp_path / "node.key"
    write_node_key(key)
    failures = []
    rounds, width = 50, 8
    for n in range(rounds):
        s = Store(drun, drun_bin, tmp_path / f"store-{n}", key)
        procs = [subprocess.Popen(s.argv("ls", "--json"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(width)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            if p.returncode != 0 or out.strip() != b"[]":
                failures.append(repr(Result(p.args[1:], p.returncode, out.decode(errors="replace"),
                                            err.decode(errors="replace"))))
        s("verify").ok()
    assert not failures, f"{len(failures)} of {rounds * width} concurrent first opens failed:\n" + "\n".join(failures[:3])


def test_verify_concurrent_with_rm_and_gc(drun, drun_keys, store, tmp_path):
    """A scrub running while other processes remove artifacts (rm, gc) never fails: an artifact removed
    meanwhile is not a failed piece (exit 1) nor an I/O error (exit 3). rm may refuse an artifact the
    scrub holds at that moment, with exit 2 "in use"."""
    models = [make_model(tmp_path / f"m{k}" / "model", {"w.bin": 100_000 + k}, seed=k) for k in range(30)]
    pub = None
    for mk in models:
        pub = sign_model(drun, drun_keys, mk)
    stop = threading.Event()
    failures, runs = [], [0]

    def scrub():
        while not stop.is_set() and len(failures) < 5:
            p = subprocess.run(store.argv("verify"), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            runs[0] += 1
            if p.returncode != 0:
                failures.append(repr(Result(["cache", "verify"], p.returncode, p.stdout.decode(errors="replace"),
                                            p.stderr.decode(errors="replace"))))

    for cycle in range(2):
        ids = [store.imported(mk, pub)[0] for mk in models]
        threads = [threading.Thread(target=scrub, daemon=True) for _ in range(2)]
        stop.clear()
        for t in threads:
            t.start()
        try:
            for art in ids[:-5]:
                # rm refuses an artifact that a scrub is reading at that moment (it holds it like a
                # reader does); either outcome is fine, anything else is not.
                r = store("rm", art)
                assert r.rc == 0 or (r.rc == 2 and "in use" in r.err), r
                time.sleep(0.005)
            if cycle == 1:
                time.sleep(1.1)  # last_access may have a resolution of one second
            store("gc", "--ttl", 0).ok()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert not failures, f"a scrub failed while artifacts were removed (cycle {cycle}):\n" + "\n".join(failures)
        for art in store.ls_by_id():
            store("rm", art).ok()
    assert runs[0] > 0
    store("verify").ok()


# ------------------------------------------------------------------------------------------------
# 8. rotate-key


def test_rotate_key(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", STORE_FILES)
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    v0 = store.show(art)["key_version"]
    name = "model-00001.safetensors"
    sealed_before = store.data_file(drun, m, art, name).read_bytes()
    new = tmp_path / "new.key"
    write_node_key(new)
    ns = f"file:{new}"
    store("rotate-key", "--new-key-source", ns).ok()
    # every piece re-sealed: no piece keeps its old ciphertext
    sealed_after = store.data_file(drun, m, art, name).read_bytes()
    same = [k for k in range(pieces_of(STORE_FILES[name]))
            if sealed_before[k * PIECE:(k + 1) * PIECE] == sealed_after[k * PIECE:(k + 1) * PIECE]]
    assert not same, f"pieces {same} of {name} were not re-sealed by rotate-key"
    assert store.show(art, key_source=ns)["key_version"] > v0
    store("verify", key_source=ns).ok()
    store.export_identical(art, tmp_path / "out", m, key_source=ns)
    store("ls").fails(2, any_of=WRONG_KEY)
    store("export", art, tmp_path / "old").fails(2, any_of=WRONG_KEY)
    assert not (tmp_path / "old").exists() or not any((tmp_path / "old").iterdir())
    # and the new key rotates on again
    newer = tmp_path / "newer.key"
    write_node_key(newer)
    store("rotate-key", "--new-key-source", f"file:{newer}", key_source=ns).ok()
    store.export_identical(art, tmp_path / "out2", m, key_source=f"file:{newer}")
    store("ls", key_source=ns).fails(2, any_of=WRONG_KEY)


def test_sigkill_during_rotate_key(drun, drun_bin, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "big", BIG_FILES)
    pub = sign_model(drun, drun_keys, m)
    art, _ = store.imported(m, pub)
    v0 = store.show(art)["key_version"]
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    made = []

    def fresh_key():
        k = tmp_path / f"node-{len(made) + 1}.key"
        write_node_key(k)
        made.append(k)
        return f"file:{k}"

    # how long a whole rotation takes here (the faster of two), so that the kills land inside one
    cal = Store(drun, drun_bin, tmp_path / "calibration", store.key)
    shutil.copytree(store.dir, cal.dir)
    times, ks = [], cal.ks
    for _ in range(2):
        nk = fresh_key()
        t0 = time.monotonic()
        cal("rotate-key", "--new-key-source", nk, key_source=ks).ok()
        times.append(time.monotonic() - t0)
        ks = nk
    shutil.rmtree(cal.dir)
    max_delay = max(0.005, min(times))

    cur, target, retired = store.ks, fresh_key(), []
    killed, outcomes = 0, []
    for _ in range(10):
        res = popen_killed(store.argv("rotate-key", "--new-key-source", target, key_source=cur),
                           rng.uniform(0.1, 1.0) * max_delay)
        outcomes.append(res.rc)
        if res.rc == -signal.SIGKILL:
            killed += 1
            continue
        if res.rc == 0:
            max_delay /= 2  # it ran faster than the calibration
        else:
            # an earlier killed attempt had already switched the store to `target`
            res.fails(2, any_of=WRONG_KEY)
        # the store is under `target` now; the next attempt opens it with that key (finishing any
        # rotation a kill interrupted after the switch) and rotates on to a fresh key
        retired.append(cur)
        cur, target = target, fresh_key()
    msg = f"(seed {seed}, full rotation {min(times):.3f} s, exit statuses {outcomes})"
    assert killed >= 3, f"too few rotate-key runs were killed mid-way {msg}"

    # run the interrupted rotation to completion
    r = store("rotate-key", "--new-key-source", target, key_source=cur)
    if r.rc != 0:
        r.fails(2, any_of=WRONG_KEY)  # only if the last killed attempt had already switched to `target`
    retired.append(cur)
    final = target
    store("verify", key_source=final).ok()
    sh = store.show(art, key_source=final)
    assert sh["key_version"] > v0, msg
    assert sum(f["stored_pieces"] for f in sh["files"]) == total_pieces(m), msg
    store.export_identical(art, tmp_path / "out", m, key_source=final)
    for old in retired:
        store("ls", key_source=old).fails(2, any_of=WRONG_KEY)


# ------------------------------------------------------------------------------------------------
# 9. a full disk


@contextlib.contextmanager
def small_tmpfs(tmp_path, size):
    """A tmpfs of `size` mounted at tmp_path/small for the block, unmounted after; skips without root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode(errors='replace').strip()}")
    try:
        yield small
    finally:
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_disk_full_is_io_error_and_store_stays_consistent(drun, drun_bin, drun_keys, tmp_path):
    with small_tmpfs(tmp_path, "6m") as small:
        key = tmp_path / "node.key"
        write_node_key(key)
        s = Store(drun, drun_bin, small / "store", key)
        big = make_model(tmp_path / "big", {"part-1.bin": 3 * MiB + MiB // 2, "part-2.bin": 3 * MiB + MiB // 2,
                                            "part-3.bin": 3 * MiB})
        pub = sign_model(drun, drun_keys, big)
        total = total_pieces(big)
        s.import_(big, pub).fails(3, "No space left")
        s("verify").ok()
        ls = s.ls()
        assert len(ls) <= 1, ls
        for a in ls:
            assert a["stored_pieces"] < total, a
            s("verify", a["id"]).ok()
            assert sum(f["stored_pieces"] for f in s.show(a["id"])["files"]) == a["stored_pieces"]
            s("rm", a["id"]).ok()
        assert s.ls() == []
        # the store still works once there is room
        sm = make_model(tmp_path / "smallmodel", SMALL_FILES)
        sign_model(drun, drun_keys, sm)
        art, _ = s.imported(sm, pub)
        s("verify").ok()
        s.export_identical(art, tmp_path / "out", sm)


def test_disk_full_in_the_middle_of_a_batch_loses_only_that_batch(drun, drun_bin, drun_keys, tmp_path):
    """Data files are reserved when an artifact is added, so a disk fills mid-import where the index
    grows: a batch's commit. The free space is set, by a filler file, to the model's size plus a
    slack; over a range of slacks some import must stop with ENOSPC after some batches committed.
    Every one of them keeps what it committed (verified), and resumes from there once there is room."""
    with small_tmpfs(tmp_path, "16m") as small:
        key = tmp_path / "node.key"
        write_node_key(key)
        s = Store(drun, drun_bin, small / "store", key)
        first = make_model(tmp_path / "first", SMALL_FILES)
        pub = sign_model(drun, drun_keys, first)
        s.imported(first, pub)  # the store and its index exist
        m = make_model(tmp_path / "m", BIG_FILES)
        sign_model(drun, drun_keys, m)
        size = sum(p.stat().st_size for p in m.rglob("*") if p.is_file() and p.name != "model.sig")
        total = total_pieces(m)
        filler = small / "filler"
        outcomes = []

        def slacks():
            # 24 KiB steps; where an import that stored nothing is followed by one that stored
            # everything, the pages between the two, one by one: how the pieces fell into batches
            # this time (by count, or by age on a loaded machine) sets how narrow that window is.
            slack = 8 << 10
            while slack < 1 << 20:
                yield slack
                if len(outcomes) >= 2 and outcomes[-2][1:] == (3, 0) and outcomes[-1][1] == 0:
                    yield from range(outcomes[-2][0] + (4 << 10), outcomes[-1][0], 4 << 10)
                slack += 24 << 10

        for slack in slacks():
            filler.unlink(missing_ok=True)
            st = os.statvfs(small)
            free = st.f_bavail * st.f_frsize
            if free - size - slack <= 0:
                break
            with open(filler, "wb") as f:
                f.truncate(0)
                os.posix_fallocate(f.fileno(), 0, free - size - slack)
            r = s.import_(m, pub)
            filler.unlink()  # room again for what follows (ls, verify and rm write to the index too)
            ls = {a["subject"]: a for a in s.ls()}
            stored = ls["m"]["stored_pieces"] if "m" in ls else 0
            outcomes.append((slack, r.rc, stored))
            if r.rc == 0:
                assert stored == total, (slack, r)
                s("rm", ls["m"]["id"]).ok()
                continue
            assert r.rc == 3 and "No space left" in r.err, f"slack {slack}: {r!r}"
            s("verify").ok()  # what was committed before the disk filled is whole and verified
            if 0 < stored < total:
                # the import resumes from the committed batches and completes
                art, again = s.imported(m, pub)
                assert already_stored(again) == stored, (slack, stored, again)
                s.export_identical(art, tmp_path / f"out-{slack}", m)
                break
            if "m" in ls:
                s("rm", ls["m"]["id"]).ok()
        assert any(rc == 3 and 0 < stored < total for _, rc, stored in outcomes), \
            f"no import ran out of space between batches: (slack, exit, stored) = {outcomes}"


# ------------------------------------------------------------------------------------------------
# 10. gc, pin, rm


def test_gc_pin_unpin_rm(drun, drun_keys, store, tmp_path):
    ma = make_model(tmp_path / "a" / "model", SMALL_FILES, seed=1)
    mb = make_model(tmp_path / "b" / "model", SMALL_FILES, seed=2)
    mc = make_model(tmp_path / "c" / "model", SMALL_FILES, seed=3)
    pub = sign_model(drun, drun_keys, ma)
    sign_model(drun, drun_keys, mb)
    sign_model(drun, drun_keys, mc)
    a, _ = store.imported(ma, pub)
    b, _ = store.imported(mb, pub)
    store("pin", a[:8]).ok()
    ls = store.ls_by_id()
    assert set(ls) == {a, b} and ls[a]["pinned"] is True and ls[b]["pinned"] is False, ls
    assert store.show(a)["pinned"] is True

    time.sleep(1.1)  # last_access may have a resolution of one second
    r = store("gc", "--ttl", 0).ok()
    assert b[:8] in r.out, f"gc must print what it removed{r!r}"
    assert set(store.ls_by_id()) == {a}
    assert not store.artifact_dir(b).exists(), all_paths(store.dir / "artifacts")
    assert store.artifact_dir(a).is_dir()
    store.export_identical(a, tmp_path / "out-a", ma)

    # size limits never remove a pinned artifact, but do remove unpinned ones
    c, _ = store.imported(mc, pub)
    store("gc", "--high", 1, "--low", 0).ok()
    assert set(store.ls_by_id()) == {a}
    assert not store.artifact_dir(c).exists()
    store("unpin", a).ok()
    assert store.ls_by_id()[a]["pinned"] is False
    store("gc", "--high", 1, "--low", 0).ok()
    assert store.ls() == []
    assert not store.artifact_dir(a).exists()

    # least recently used goes first: import X, then Y, then read X
    x, _ = store.imported(ma, pub)
    time.sleep(1.1)
    y, _ = store.imported(mb, pub)
    time.sleep(1.1)
    store.export_identical(x, tmp_path / "out-x", ma)
    ls = store.ls_by_id()
    bx, by = ls[x]["bytes"], ls[y]["bytes"]
    r = store("gc", "--high", bx + by - 1, "--low", bx + by // 2).ok()
    assert set(store.ls_by_id()) == {x}, f"gc must remove only the least recently used artifact{r!r}"
    assert y[:8] in r.out

    # rm
    store("rm", x[:8]).ok()
    assert store.ls() == [] and not store.artifact_dir(x).exists()
    store("rm", "deadbeefdeadbeef").fails(2, "no artifact")
    store("pin", "deadbeefdeadbeef").fails(2, "no artifact")
    # Not tested: "gc never removes artifacts another process is reading". The contract gives no way to
    # hold an artifact open for a known time (a background export is over too quickly to race reliably).


# ------------------------------------------------------------------------------------------------
# 11. files-mode bundles


def test_files_mode_bundle_is_refused(drun, drun_keys, store, tmp_path):
    m = make_model(tmp_path / "m", SMALL_FILES)
    pub = sign_model(drun, drun_keys, m, method="files")
    store.import_(m, pub).fails(2, "shards")
    assert store.ls() == []


def test_missing_key_file_is_a_configuration_error(drun, tmp_path):
    # Found by review: a key file that does not exist exited 3 (I/O) instead of 2.
    r = drun("cache", "ls", "--store", tmp_path / "store", "--key-source", f"file:{tmp_path / 'absent.key'}")
    r.fails(2, "node key")
    assert not (tmp_path / "store").exists()


def test_store_shared_with_others_is_a_configuration_error(store, drun_keys, tmp_path):
    # A store directory others can write into (or, as root, one owned by another user) is refused
    # with exit 2 and its path named, before anything is read from it.
    store.dir.mkdir()
    store.dir.chmod(0o777)
    store("ls").fails(2, "writable by group or others")
    if os.geteuid() == 0:
        store.dir.chmod(0o700)
        os.chown(store.dir, 65534, 65534)
        store("ls").fails(2, "owned by uid 65534")
        os.chown(store.dir, 0, 0)
    store.dir.chmod(0o700)
    store("ls").ok()


def test_memory_stays_bounded_with_huge_pieces(drun, drun_keys, store, tmp_path):
    # 300 MiB in pieces of 256 MiB (model_signing's default shards are 1 GB): import, verify and
    # export stream every piece, so none of them may hold a whole piece in memory.
    m = tmp_path / "big"
    m.mkdir()
    w = m / "weights.bin"
    with open(w, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(300 << 20)  # the rest is a hole: cheap to make, real to read
        f.seek(299 << 20)
        f.write(os.urandom(1 << 20))
    key, pub = drun_keys["ecdsa-p256"]
    drun("sign", m, "--key", key, "--piece-size", 256 << 20).ok()

    def peak_kib(*args):
        p = subprocess.run(["/usr/bin/time", "-f", "%M", *store.argv(*args)], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        return int(p.stderr.decode().strip().splitlines()[-1])

    # KiB, half a piece; under ASan (its shadow memory and quarantine) three quarters of one
    limit = (192 if "ASAN_OPTIONS" in os.environ else 128) << 10
    assert peak_kib("import", m, "--public-key", pub, "--threads", 2) < limit
    assert peak_kib("verify") < limit
    art = store.ls()[0]["id"]
    assert peak_kib("export", art, tmp_path / "out") < limit
    assert hashlib.sha256((tmp_path / "out" / "weights.bin").read_bytes()).digest() == \
        hashlib.sha256(w.read_bytes()).digest()
