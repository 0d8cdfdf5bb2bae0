"""drun.load_safetensors from the encrypted store against what a user does without drun: reading
the same plaintext .safetensors file with numpy from the page cache (one readinto into a
preallocated buffer, then zero-copy views per tensor, as safetensors' numpy loader does).

    PYTHONPATH=BUILD/bindings/python /usr/bin/python3 benchmarks/bench_safetensors.py BUILD WORK [SIZE_MIB]
"""

import json
import os
import struct
import subprocess
import sys
import time

import numpy as np

import drun


def write_safetensors(path, size_mib):
    # 16 F32 tensors sharing the size: a typical shard's shape.
    per = (size_mib << 20) // 16 // 4
    header, offset = {}, 0
    for i in range(16):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [per], "data_offsets": [offset, offset + per * 4]}
        offset += per * 4
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _ in range(16):
            f.write(rng.standard_normal(per, dtype=np.float32).tobytes())


def numpy_load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size - 8 - n
        buf = np.empty(size, dtype=np.uint8)
        f.readinto(memoryview(buf))
    return {k: buf[v["data_offsets"][0]:v["data_offsets"][1]].view(np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def best_of(n, fn):
    best = None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        del out
        best = dt if best is None else min(best, dt)
    return best


def main():
    build, work = sys.argv[1], sys.argv[2]
    size_mib = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    drun_bin = os.path.join(build, "drun")
    model = os.path.join(work, "st-model")
    os.makedirs(model, exist_ok=True)
    path = os.path.join(model, "model.safetensors")
    if not os.path.exists(path) or os.path.getsize(path) < (size_mib << 20):
        write_safetensors(path, size_mib)
    key, node_key, store_dir = (os.path.join(work, n) for n in ("st.key", "st-node.key", "st-store"))
    if not os.path.exists(key):
        drun.keygen("ed25519", key)
    if not os.path.exists(node_key):
        subprocess.run([drun_bin, "cache", "keygen", "--out", node_key], check=True, capture_output=True)
    sig = drun.sign(model, key, signature=os.path.join(work, "st-model.sig"))
    store = drun.Store(store_dir, key_source=f"file:{node_key}")
    art = store.import_model(model, signature=sig, public_key=key + ".pub")

    numpy_load(path)  # page cache warm for both: the store's data files were just written
    a, b = numpy_load(path), drun.load_safetensors(store, art, "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    del a, b
    t_numpy = best_of(3, lambda: numpy_load(path))
    t_drun = best_of(3, lambda: drun.load_safetensors(store, art, "model.safetensors"))
    mib = os.path.getsize(path) / 1048576
    print(f"numpy, plaintext file from the page cache : {t_numpy:.3f} s ({mib / t_numpy:.0f} MiB/s)")
    print(f"drun.load_safetensors, encrypted store    : {t_drun:.3f} s ({mib / t_drun:.0f} MiB/s, "
          f"{t_drun / t_numpy:.2f}x numpy's time; every piece authenticated)")


if __name__ == "__main__":
    main()
