"""Shared fixtures for the drun CLI tests.

Run with Debian's interpreter:  DRUN_BIN=/path/to/drun /usr/bin/python3 -m pytest -q tests/python
Tests that run the drun binary skip (with a message) when DRUN_BIN is unset or not executable;
the oms_ref self-tests (test_interop.py -k oms_ref) need no drun. The Python binding's tests
(test_binding.py, test_examples.py) also need PYTHONPATH=BUILD/bindings/python; they skip without it,
or fail when DRUN_REQUIRE_BINDING=1 (binding_kit.require_binding).
"""

import base64
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import oms_ref  # noqa: E402

PIECE = 65536  # small piece size used by the shard tests (drun allows powers of two >= 4096)

# A stdout line that claims success. Failing commands must print none of these to stdout.
SUCCESS_RE = re.compile(r"\b(ok|okay|verified|verification (succeeded|passed)|success(ful|fully)?|passed|"
                        r"signed|valid)\b", re.IGNORECASE)


class Result:
    def __init__(self, args, rc, out, err):
        self.args, self.rc, self.out, self.err = args, rc, out, err

    def __repr__(self):
        return (f"\n$ drun {' '.join(self.args)}\nexit status: {self.rc}\n--- stdout ---\n{self.out}"
                f"--- stderr ---\n{self.err}")

    def ok(self):
        assert self.rc == 0, f"expected success{self!r}"
        return self

    def fails(self, rc, *fragments, any_of=()):
        """Assert exit status `rc` (an int or a tuple of allowed ints), every fragment in stderr
        (case-insensitive), at least one of `any_of` in stderr, and no success claim on stdout."""
        allowed = rc if isinstance(rc, tuple) else (rc,)
        assert self.rc in allowed, f"expected exit status {rc}{self!r}"
        err = self.err.lower()
        for frag in fragments:
            assert frag.lower() in err, f"stderr lacks {frag!r}{self!r}"
        if any_of:
            assert any(f.lower() in err for f in any_of), f"stderr has none of {any_of!r}{self!r}"
        assert not SUCCESS_RE.search(self.out), f"stdout claims success on failure{self!r}"
        assert self.err.strip(), f"failure without a message on stderr{self!r}"
        return self


def _drun_bin():
    p = os.environ.get("DRUN_BIN")
    if os.environ.get("DRUN_REQUIRE_BIN") == "1" and not (p and os.access(p, os.X_OK)):
        # Under ctest a missing binary is a failure, never a silent skip.
        pytest.fail(f"DRUN_REQUIRE_BIN=1 but DRUN_BIN={p!r} is not an executable")
    if not p:
        pytest.skip("DRUN_BIN is not set: build drun and run with DRUN_BIN=/path/to/drun to test the CLI")
    if not (os.path.isfile(p) and os.access(p, os.X_OK)):
        pytest.skip(f"DRUN_BIN={p} does not exist or is not executable")
    return p


@pytest.fixture(scope="session")
def drun_bin():
    return _drun_bin()


@pytest.fixture
def drun(drun_bin):
    """drun(*args, timeout=60) -> Result. Arguments are stringified; stdin is /dev/null."""

    def run(*args, timeout=60):
        args = [str(a) for a in args]
        try:
            p = subprocess.run([drun_bin, *args], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"drun {' '.join(args)} did not finish within {timeout} s")
        return Result(args, p.returncode, p.stdout.decode("utf-8", "replace"),
                      p.stderr.decode("utf-8", "replace"))

    return run


# ------------------------------------------------------------------------------------------------
# models


def det_bytes(n, seed):
    return random.Random(seed).randbytes(n)


# Names chosen so that component-wise order and code-point order differ ("tokenizer.json" vs
# "tokenizer/..."), with a nested directory and a multi-piece file. No empty file: shards cannot
# sign one, so verifiers refuse it unless told otherwise (EMPTY_FILE, for the tests of that).
MODEL_FILES = {
    "config.json": b'{"architectures": ["TinyModel"], "hidden_size": 64, "num_layers": 2}\n',
    "weights.bin": 200 * 1024,        # 4 pieces of 64 KiB: [0,65536) ... [196608,204800)
    "tokenizer.json": 3000,
    "tokenizer/vocab.txt": b"".join(b"token%d\n" % i for i in range(400)),
    "nested/deeper/data.bin": 5000,
}
EMPTY_FILE = "tokenizer/empty.txt"


def make_model(root, files=None, seed=1):
    """Create a model directory `root` from {relpath: bytes | size}; returns Path(root)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (rel, content) in enumerate((files or MODEL_FILES).items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            content = det_bytes(content, seed * 1000 + i)
        p.write_bytes(content)
    return root


def model_file_names(root, include_empty=True):
    root = Path(root)
    out = set()
    for p in root.rglob("*"):
        if p.is_file() and p.name != "model.sig" and (include_empty or p.stat().st_size):
            out.add(p.relative_to(root).as_posix())
    return out


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "tinymodel")


@pytest.fixture
def single_file(tmp_path):
    p = tmp_path / "single.bin"
    p.write_bytes(det_bytes(150 * 1024, 7))  # 3 pieces of 64 KiB, last one short
    return p


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# ------------------------------------------------------------------------------------------------
# keys


DRUN_KEY_TYPES = ("ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521")
ECDSA_TYPES = {"ecdsa-p256": "p256", "ecdsa-p384": "p384", "ecdsa-p521": "p521"}


class _DrunKeys:
    """{type: (private_path, public_path)}, each made by `drun keygen` on first use and cached for the
    session; a type whose keygen fails fails only the tests that use it."""

    def __init__(self, directory, drun_bin):
        self.dir, self.bin, self.cache = directory, drun_bin, {}

    def __getitem__(self, t):
        if t not in self.cache:
            k = self.dir / f"{t}.key"
            p = subprocess.run([self.bin, "keygen", "--type", t, "--out", str(k)], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=60)
            if p.returncode == 0:
                self.cache[t] = (k, Path(str(k) + ".pub"))
            else:
                self.cache[t] = (f"drun keygen --type {t} failed with exit status {p.returncode}: "
                                 f"{p.stderr.decode(errors='replace')}")
        v = self.cache[t]
        if isinstance(v, str):
            pytest.fail(v)
        return v


@pytest.fixture(scope="session")
def drun_keys(tmp_path_factory, drun_bin):
    return _DrunKeys(tmp_path_factory.mktemp("drun_keys"), drun_bin)


@pytest.fixture(scope="session")
def ref_keys(tmp_path_factory):
    """{curve: (private_key_object, private_path, public_path)} made with `cryptography`."""
    d = tmp_path_factory.mktemp("ref_keys")
    keys = {}
    for c in ("p256", "p384", "p521", "ed25519"):
        key = oms_ref.generate_key(c)
        kp, pp = d / f"{c}.key", d / f"{c}.pub"
        oms_ref.write_private_key(kp, key)
        oms_ref.write_public_key(pp, key.public_key())
        keys[c] = (key, kp, pp)
    return keys


# ------------------------------------------------------------------------------------------------
# bundles


def load_bundle(path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def bundle_statement(bundle_or_path):
    b = bundle_or_path if isinstance(bundle_or_path, dict) else load_bundle(bundle_or_path)
    return json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))


def save_bundle(bundle, path):
    Path(path).write_text(json.dumps(bundle, indent=2))
