"""The Triton repository agent example (examples/triton): its logic, drun_localize::localize(), run
through the test driver `drun_localize_test REPOSITORY_DIR DESTINATION` as the agent runs it on a
model load. A model repository directory holds config.pbtxt, drun.json, the bundle and the
publisher's key; the model itself is fetched from an nginx origin started here, verified piece by
piece into an encrypted store, and materialized into the destination Triton would read.

The driver is $DRUN_TRITON_DRIVER; unset, it is looked for in the build tree of $DRUN_BIN (so that
ctest runs the driver of the tree it tests), then at /work/main/build/examples/triton. Without it
these tests skip, unless DRUN_REQUIRE_BIN=1. Signing needs the drun CLI ($DRUN_BIN), as in
test_fetch.py."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Result, det_bytes, flip_byte
from test_fetch import Nginx, same_tree

PIECE = 65536
MODEL_SIZE = 20 * PIECE + 123
DEFAULT_DRIVER = "/work/main/build/examples/triton/drun_localize_test"

# What a Triton model directory holds when the drun agent localizes it: the configuration Triton
# reads (naming the agent), drun.json, and no model files.
CONFIG_PBTXT = """name: "mymodel"
backend: "onnxruntime"
model_repository_agents { agents [ { name: "drun" } ] }
"""


def _driver_path():
    if "DRUN_TRITON_DRIVER" in os.environ:
        return os.environ["DRUN_TRITON_DRIVER"]
    drun_bin = os.environ.get("DRUN_BIN")
    if drun_bin:  # BUILD/drun -> BUILD/examples/triton/drun_localize_test
        beside = Path(drun_bin).resolve().parent / "examples" / "triton" / "drun_localize_test"
        if beside.is_file():
            return str(beside)
    return DEFAULT_DRIVER


@pytest.fixture(scope="session")
def driver():
    p = _driver_path()
    if not (os.path.isfile(p) and os.access(p, os.X_OK)):
        if os.environ.get("DRUN_REQUIRE_BIN") == "1":
            pytest.fail(f"DRUN_REQUIRE_BIN=1 but the Triton example's driver {p!r} is not an executable")
        pytest.skip(f"{p} is not built (cmake --build build --target drun_localize_test), or set DRUN_TRITON_DRIVER")
    return p


class Setup:
    """A published model (what the origin serves), its repository directory, an nginx origin."""

    def __init__(self, tmp, drun, drun_keys):
        self.tmp = tmp
        self.published = tmp / "published"
        (self.published / "1").mkdir(parents=True)
        (self.published / "1" / "model.onnx").write_bytes(det_bytes(MODEL_SIZE, 11))
        (self.published / "1" / "labels.txt").write_bytes(b"cat\ndog\n")
        self.repo = tmp / "models" / "mymodel"
        self.repo.mkdir(parents=True)
        key, pub = drun_keys["ecdsa-p256"]
        drun("sign", self.published, "--key", key, "--piece-size", PIECE, "--signature", self.repo / "model.sig").ok()
        shutil.copy(pub, self.repo / "publisher.pub")
        (self.repo / "config.pbtxt").write_text(CONFIG_PBTXT)
        drun("cache", "keygen", "--out", tmp / "node.key").ok()
        self.nginx = Nginx(tmp, self.published)

    def config(self, **changes):
        """drun.json's fields; signature and public_key relative to the repository directory."""
        fields = {
            "signature": "model.sig",
            "public_key": "publisher.pub",
            "origins": [self.nginx.url()],
            "store": str(self.tmp / "store"),
            "key_source": f"file:{self.tmp / 'node.key'}",
        }
        for k, v in changes.items():
            if v is None:
                fields.pop(k, None)
            else:
                fields[k] = v
        return fields

    def write_config(self, fields=None, text=None, **changes):
        (self.repo / "drun.json").write_text(text if text is not None else json.dumps(fields or self.config(**changes)))


@pytest.fixture
def setup(tmp_path, drun, drun_keys):
    s = Setup(tmp_path, drun, drun_keys)
    yield s
    s.nginx.stop()


def localize(driver, repo, dest, timeout=120):
    # From another directory: relative paths in drun.json must resolve against the repository.
    p = subprocess.run([driver, str(repo), str(dest)], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout, cwd="/")
    return Result(["drun_localize_test", str(repo), str(dest)], p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


def model_files(d):
    return sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*") if p.is_file()) if Path(d).exists() else []


def test_localizes_the_verified_model_and_a_second_load_fetches_nothing(driver, setup):
    setup.write_config()
    dest = setup.tmp / "acquired"
    dest.mkdir()  # empty, as Triton's TRITONREPOAGENT_ModelRepositoryLocationAcquire hands it over
    r = localize(driver, setup.repo, dest).ok()
    assert r.out.strip() == str(dest), r
    assert same_tree(setup.published, dest)
    assert model_files(dest) == ["1/labels.txt", "1/model.onnx"]
    assert setup.nginx.bytes_sent("model.onnx") == MODEL_SIZE

    # The next load (another model instance, a restart) finds every piece in the store.
    dest2 = setup.tmp / "acquired-again"
    localize(driver, setup.repo, dest2).ok()
    assert same_tree(setup.published, dest2)
    assert setup.nginx.bytes_sent("model.onnx") == MODEL_SIZE


def test_tampered_file_on_the_origin_fails_naming_it_and_leaves_no_model_file(driver, setup):
    setup.write_config()
    flip_byte(setup.published / "1" / "model.onnx", 5 * PIECE + 17)  # piece 5 of model.onnx
    dest = setup.tmp / "acquired"
    dest.mkdir()
    r = localize(driver, setup.repo, dest).fails(1, "1/model.onnx", "fetch")
    assert f"bytes [{5 * PIECE}, {6 * PIECE})" in r.err, r
    assert r.out == "", r
    assert model_files(dest) == [], r


@pytest.mark.parametrize("change, fragments", [
    ({"origin": ["http://127.0.0.1:1/"]}, ['unknown field "origin"']),
    ({"store": None}, ['missing field "store"']),
    ({"key_source": None}, ['missing field "key_source"']),
    ({"signature": None}, ['missing field "signature"']),
    ({"origins": "http://127.0.0.1:1/"}, ['field "origins" must be a list of strings, not a string']),
    ({"origins": ["http://127.0.0.1:1/", 7]}, ['field "origins"[1] must be a string, not a number']),
    ({"store": 5}, ['field "store" must be a string, not a number']),
    ({"connections": "8"}, ['field "connections" must be a whole number']),
    ({"connections": 0}, ['field "connections" must be from 1 to 256, not 0']),
    ({"connections": 2.5}, ['field "connections" must be a whole number']),
    ({"ca_bundle": "ca.pem"}, ['exactly one of field "public_key" and field "ca_bundle"']),
    ({"public_key": None}, ['exactly one of field "public_key" and field "ca_bundle"']),
    ({"origins": []}, ['field "origins"', 'field "peers"']),
    ({"peers": ["127.0.0.1:7000"]}, ['field "peers" needs field "ca_cert"']),
    ({"tls_cert": "node.pem"}, ['field "tls_cert" and field "tls_key" go together']),
    ({"key_source": "node.key"}, ['field "key_source" must be file:PATH, env:NAME or cmd:COMMAND']),
    ({"signature": "ftp://example.com/model.sig"}, ['field "signature" must be an http:// or https:// URL or a path']),
])
def test_bad_drun_json_is_refused_naming_the_field(driver, setup, change, fragments):
    setup.write_config(**change)
    dest = setup.tmp / "acquired"
    localize(driver, setup.repo, dest).fails(1, "drun.json", *fragments)
    assert not dest.exists()
    assert setup.nginx.bytes_sent("model.onnx") == 0


@pytest.mark.parametrize("text, fragment", [
    ('{"store": "/a", "store": "/b"}', 'field "store" appears more than once'),
    ('["signature"]', "must hold a JSON object"),
    ('{"signature": "model.sig",', "not valid JSON"),
])
def test_ambiguous_or_malformed_drun_json_is_refused(driver, setup, text, fragment):
    setup.write_config(text=text)
    localize(driver, setup.repo, setup.tmp / "acquired").fails(1, "drun.json", fragment)


def test_missing_drun_json_is_named(driver, setup):
    localize(driver, setup.repo, setup.tmp / "acquired").fails(1, "drun.json")


def test_untrusted_bundle_downloads_nothing(driver, setup, drun_keys):
    shutil.copy(drun_keys["ecdsa-p384"][1], setup.repo / "other.pub")
    setup.write_config(public_key="other.pub")
    dest = setup.tmp / "acquired"
    localize(driver, setup.repo, dest).fails(1, "verify", "model.sig")
    assert not dest.exists()
    assert setup.nginx.bytes_sent("model.onnx") == 0


def test_non_empty_destination_is_refused_before_fetching(driver, setup):
    setup.write_config()
    dest = setup.tmp / "acquired"
    dest.mkdir()
    (dest / "keep.txt").write_text("not the model's")
    localize(driver, setup.repo, dest).fails(1, "not empty")
    assert (dest / "keep.txt").read_text() == "not the model's"
    assert setup.nginx.bytes_sent("model.onnx") == 0
