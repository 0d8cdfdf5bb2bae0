"""The Python integration examples, run the way their hosts run them, against an nginx origin started
here: examples/torchserve/handler.py as TorchServe drives a handler (construct, initialize(context),
handle(data, context)), and examples/training/fetch_dataset.py as a training job runs a script (a
subprocess, interrupted with SIGINT and rerun)."""

import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from binding_kit import (EXAMPLES, Publisher, binding_pythonpath, files_containing, flip_byte, needles_of,
                         require_binding, safetensors_bytes, tensor, tree_digests, write_node_key)

drun = require_binding()
np = pytest.importorskip("numpy")

from test_fetch import Nginx  # noqa: E402  (after the skip: it needs nothing drun, but keeps the order clear)

MiB = 1 << 20


@pytest.fixture(scope="module")
def publisher(tmp_path_factory):
    return Publisher(drun, tmp_path_factory.mktemp("publisher"))


# ------------------------------------------------------------------------------------------------
# TorchServe


def load_handler_module():
    spec = importlib.util.spec_from_file_location("drun_example_handler", EXAMPLES / "torchserve" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchserve_service(module):
    """What TorchServe's model loader does with a handler file: the one class it defines, instantiated."""
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    assert len(classes) == 1, f"TorchServe needs exactly one class in a handler module, found {classes}"
    return classes[0]()


def torchserve_context(model_dir):
    return SimpleNamespace(
        system_properties={"model_dir": str(model_dir), "gpu_id": None, "batch_size": 2, "server_name": "MMS",
                           "server_version": "0.8.0", "limit_max_image_pixels": True},
        manifest={"createdOn": "01/01/2026 00:00:00", "runtime": "python",
                  "model": {"modelName": "tiny", "handler": "handler.py", "modelVersion": "1.0"},
                  "archiverVersion": "0.8.0"},
        model_name="tiny", metrics=None)


@pytest.fixture
def tiny_model(tmp_path, publisher):
    """A published Linear(64 -> 8) model on an nginx origin, and the TorchServe model_dir that points at it."""
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(3)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    weights = safetensors_bytes({"weight": tensor(weight), "bias": tensor(bias)}, metadata={"format": "pt"})
    published = tmp_path / "origin"
    _, _, artifact = publisher.model(published, {"model.safetensors": weights, "config.json": b'{"in": 64, "out": 8}'},
                    piece_size=4096, signature=published / "model.sig")  # served next to the model, as a hub does
    origin = Nginx(tmp_path, published)

    model_dir = tmp_path / "model_dir"  # what TorchServe unpacks from the .mar: the config and the key
    model_dir.mkdir()
    shutil.copy(publisher.pub, model_dir / "publisher.pub")
    store, key_source = tmp_path / "store", write_node_key(tmp_path / "node.key")
    (model_dir / "drun.json").write_text(json.dumps({
        "signature": origin.url("model.sig"), "public_key": "publisher.pub", "origins": [origin.url()],
        "store": str(store), "key_source": key_source, "weights": "model.safetensors"}))
    yield SimpleNamespace(torch=torch, weight=weight, bias=bias, raw=weights, published=published, origin=origin,
                          model_dir=model_dir, store=store, key_source=key_source, artifact=artifact)
    origin.stop()


def test_torchserve_handler_serves_verified_weights_from_memory(tiny_model, tmp_path):
    t = tiny_model
    handler = torchserve_service(load_handler_module())
    context = torchserve_context(t.model_dir)
    handler.initialize(context)
    assert handler.initialized

    x = np.random.RandomState(4).standard_normal((3, 64)).astype(np.float32)
    data = [{"body": bytearray(json.dumps(x[0].tolist()).encode())},  # TorchServe hands bodies over as bytearray
            {"body": json.dumps(x[1].tolist())},
            {"data": x[2].tolist()}]
    out = handler.handle(data, context)
    assert isinstance(out, list) and len(out) == 3 and all(len(row) == 8 for row in out), out
    want = x.astype(np.float64) @ t.weight.T.astype(np.float64) + t.bias
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5, atol=1e-5)
    json.dumps(out)  # what TorchServe sends back must serialize

    # The parameters are the tensors drun decrypted into, in memory; the file was never written out.
    assert t.torch.equal(handler.model.weight, t.torch.from_numpy(t.weight))
    assert handler.artifact == t.artifact
    stored = {a["id"]: a for a in drun.Store(str(t.store), key_source=t.key_source).list()}
    assert stored[t.artifact]["stored_pieces"] == stored[t.artifact]["pieces"], stored
    leaks = files_containing(tmp_path, needles_of(t.raw[-(t.weight.nbytes + t.bias.nbytes):]))
    assert {p for p, _ in leaks} <= set(t.published.rglob("*")), f"plaintext weights outside the origin: {leaks}"
    assert not [p for p in t.store.rglob("*.safetensors")] + [p for p in t.model_dir.rglob("*.safetensors")]

    # A malformed request is refused with a message, not answered with garbage.
    with pytest.raises(ValueError, match="request 0"):
        handler.handle([{"body": b"[1, 2]"}], context)


def test_torchserve_function_entry_point_initializes_once(tiny_model):
    module = load_handler_module()
    context = torchserve_context(tiny_model.model_dir)
    x = [0.5] * 64
    first = module.handle([{"body": json.dumps(x)}], context)
    sent = tiny_model.origin.bytes_sent("model.safetensors")
    second = module.handle([{"body": json.dumps(x)}], context)
    assert first == second and len(first) == 1
    assert tiny_model.origin.bytes_sent("model.safetensors") == sent, "the second batch fetched again"
    assert module.handle(None, context) is None


def test_torchserve_handler_refuses_tampered_weights_and_leaves_no_plaintext(tiny_model):
    t = tiny_model
    flip_byte(t.published / "model.safetensors", len(t.raw) - 100)  # in the weights, after signing
    handler = torchserve_service(load_handler_module())
    with pytest.raises(drun.VerificationError) as info:
        handler.initialize(torchserve_context(t.model_dir))
    e = info.value
    assert e.code == "digest_mismatch" and e.path == "model.safetensors", (e.code, e.path, str(e))
    assert e.range and e.range[0] <= len(t.raw) - 100 < e.range[1], e.range
    assert not handler.initialized and handler.model is None

    assert t.store.is_dir()
    assert not files_containing(t.store, needles_of(t.raw, count=16)), "plaintext of the weights under the store"
    assert not list(t.store.rglob("*.safetensors"))
    # The pieces that did verify are kept (sealed); the bad one is not.
    files = {f["name"]: f for f in drun.Store(str(t.store), key_source=t.key_source).files(t.artifact)}
    assert files["model.safetensors"]["stored_pieces"] == files["model.safetensors"]["pieces"] - 1, files


# ------------------------------------------------------------------------------------------------
# a training job's data set


SCRIPT = EXAMPLES / "training" / "fetch_dataset.py"
PROGRESS_RE = re.compile(r"\[[#.]+\] +\d+\.\d% +\d+\.\d/\d+\.\d MiB +\d+/\d+ pieces +\d+\.\d MiB/s +\d+:\d\d left")


@pytest.fixture
def dataset(tmp_path, publisher):
    """An 8 MiB data set in four shards plus an index, signed in 1 MiB pieces, on an nginx origin."""
    shards = {f"train-{i:05d}-of-00004.bin": os.urandom(2 * MiB) for i in range(4)}
    shards["index.json"] = json.dumps({"shards": sorted(shards)}).encode()
    root = tmp_path / "dataset"
    publisher.model(root, shards, piece_size=MiB, signature=root / "model.sig")
    origin = Nginx(tmp_path, root)
    yield SimpleNamespace(root=root, origin=origin, key_source=write_node_key(tmp_path / "node.key"),
                          store=tmp_path / "store", out=tmp_path / "out", pub=publisher.pub)
    origin.stop()


def script_argv(d, *extra):
    return [sys.executable, str(SCRIPT), "--signature", d.origin.url("model.sig"), "--public-key", str(d.pub),
            "--origin", d.origin.url(), "--store", str(d.store), "--key-source", d.key_source, "--out", str(d.out),
            *map(str, extra)]


def script_env():
    return {**os.environ, "PYTHONPATH": binding_pythonpath()}


def test_fetch_dataset_script_completes_with_a_progress_bar(dataset):
    d = dataset
    r = subprocess.run(script_argv(d, "--limit-rate", "8M", "--connections", "2"), capture_output=True, text=True,
                       env=script_env(), timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert tree_digests(d.out) == tree_digests(d.root), "the output differs from the data set"
    bars = PROGRESS_RE.findall(r.stderr)
    assert len(bars) >= 2, f"expected several progress lines on stderr:\n{r.stderr}"
    assert "100.0%" in bars[-1] and "9/9 pieces" in bars[-1], bars[-1]
    assert re.search(r"fetched [0-9a-f]{64}: 5 files, 8\.0 MiB in .*; 8\.0 MiB downloaded in [\d.]+ s, "
                     r"0\.0 MiB already stored", r.stdout), r.stdout

    # Run again into a fresh directory: everything is already stored, nothing is downloaded.
    sent = d.origin.bytes_sent(".bin")
    d.out = d.out.parent / "out2"
    r = subprocess.run(script_argv(d), capture_output=True, text=True, env=script_env(), timeout=120)
    assert r.returncode == 0 and "0.0 MiB downloaded" in r.stdout and "8.0 MiB already stored" in r.stdout, r
    assert d.origin.bytes_sent(".bin") == sent
    assert tree_digests(d.out) == tree_digests(d.root)


def test_fetch_dataset_script_refuses_bad_input_with_the_documented_exit_statuses(dataset, tmp_path):
    d = dataset
    r = subprocess.run(script_argv(d)[:-2] + ["--out", str(d.root)], capture_output=True, text=True,
                       env=script_env(), timeout=60)
    assert r.returncode == 2 and "not empty" in r.stderr, r
    other = Publisher(drun, tmp_path / "other", "ecdsa-p256")
    argv = script_argv(d)
    argv[argv.index("--public-key") + 1] = str(other.pub)
    r = subprocess.run(argv, capture_output=True, text=True, env=script_env(), timeout=60)
    assert r.returncode == 1 and "does not match" in r.stderr, r
    assert d.origin.bytes_sent(".bin") == 0, "data was downloaded before the bundle verified"
    assert not d.out.exists()


def test_fetch_dataset_script_stops_on_sigint_and_a_rerun_resumes(dataset):
    d = dataset
    p = subprocess.Popen(script_argv(d, "--limit-rate", "2M", "--connections", "2"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=script_env(), stdin=subprocess.DEVNULL,
                         # Python installs its KeyboardInterrupt handler only where SIGINT is not ignored
                         # (a background job's is): start the script as an interactive shell would.
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_lines = []
    first_bar = threading.Event()

    def read_stderr():
        for line in p.stderr:
            err_lines.append(line)
            if PROGRESS_RE.search(line):
                first_bar.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert first_bar.wait(20), f"no progress line within 20 s: {''.join(err_lines)}"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=20)
        stopped_in = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(5)
    out, err = p.stdout.read(), "".join(err_lines)
    assert rc == 130, (rc, out, err)
    assert "interrupted; rerun to resume" in err, err
    assert "Traceback" not in err, err
    assert stopped_in < 3, f"the fetch took {stopped_in:.1f} s to stop"
    assert not out.strip(), f"no summary after an interruption: {out!r}"
    assert not d.out.exists() or not any(d.out.iterdir()), "partial output left in --out"

    store = drun.Store(str(d.store), key_source=d.key_source)
    (art,) = [a["id"] for a in store.list()]
    stored = sum(f["stored_pieces"] for f in store.files(art))
    assert 0 < stored < 9, f"{stored} of 9 pieces stored after the interruption"
    assert store.verify() == []
    del store

    sent = d.origin.bytes_sent(".bin")
    r = subprocess.run(script_argv(d), capture_output=True, text=True, env=script_env(), timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert tree_digests(d.out) == tree_digests(d.root)
    m = re.search(r"([\d.]+) MiB downloaded in [\d.]+ s, ([\d.]+) MiB already stored", r.stdout)
    assert m and float(m.group(2)) > 0 and float(m.group(1)) < 8, r.stdout
    assert d.origin.bytes_sent(".bin") - sent < 8 * MiB, "the rerun downloaded everything again"
