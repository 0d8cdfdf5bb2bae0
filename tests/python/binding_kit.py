"""Shared pieces for the Python binding tests (test_binding.py, test_examples.py): importing the
binding (skip, or fail under DRUN_REQUIRE_BINDING=1), node keys, signed models, a safetensors
writer, and tree comparisons.

Run with:  PYTHONPATH=BUILD/bindings/python DRUN_BIN=BUILD/drun /usr/bin/python3 -m pytest -q \
           test_binding.py test_examples.py
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from conftest import flip_byte  # noqa: F401 (re-exported for the binding tests)

REPO = Path(__file__).resolve().parents[2]
STUB = REPO / "bindings" / "python" / "drun" / "__init__.pyi"
EXAMPLES = REPO / "examples"


def require_binding():
    """The drun module. When it cannot be imported, the calling test module skips, or, when
    DRUN_REQUIRE_BINDING=1 (ctest), fails: a missing binding is then a failure, never a silent skip."""
    try:
        import drun
        import drun._drun  # noqa: F401  (the compiled part, not only the facade)
    except ImportError as e:
        msg = (f"the drun Python binding is not importable ({e}): build it with "
               "`cmake --build build --target _drun` and run with PYTHONPATH=build/bindings/python")
        if os.environ.get("DRUN_REQUIRE_BINDING") == "1":
            pytest.fail(f"DRUN_REQUIRE_BINDING=1 but {msg}", pytrace=False)
        pytest.skip(msg, allow_module_level=True)
    return drun


def binding_pythonpath():
    """The PYTHONPATH a subprocess needs to import the same drun as this process."""
    import drun
    here = str(Path(drun.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + rest if rest else "")


def write_node_key(path):
    """A fresh 32-byte node key as 64 hex characters, mode 0600; returns its key source."""
    path = Path(path)
    path.write_text(os.urandom(32).hex() + "\n")
    os.chmod(path, 0o600)
    return f"file:{path}"


def tree_digests(root, skip=("model.sig",)):
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and p.name not in skip}


def files_containing(root, needles):
    """[(path, needle index)] for every file under root that contains one of the byte strings."""
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [(p, i) for i, n in enumerate(needles) if n in data]
    return hits


def needles_of(data, count=8, width=32):
    """`count` distinct `width`-byte windows spread over data: if any is found in a file, plaintext leaked."""
    step = max(1, (len(data) - width) // max(1, count - 1))
    return [bytes(data[o:o + width]) for o in range(0, len(data) - width + 1, step)][:count]




# ------------------------------------------------------------------------------------------------
# safetensors, written by hand: 8-byte little-endian header length N, N bytes of JSON, then the data


def tensor(array, dtype=None):
    """(dtype name, shape, raw little-endian bytes) of a numpy array; dtype defaults from the array."""
    import numpy as np
    names = {"|b1": "BOOL", "|u1": "U8", "|i1": "I8", "<u2": "U16", "<i2": "I16", "<f2": "F16", "<u4": "U32",
             "<i4": "I32", "<f4": "F32", "<u8": "U64", "<i8": "I64", "<f8": "F64"}
    a = np.asarray(array)  # (not ascontiguousarray: it turns a 0-d array into shape [1])
    a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)
    return dtype or names[a.dtype.str], list(a.shape), a.tobytes()


def bf16_bits(values):
    """The bfloat16 bit patterns (uint16) of float32 values (truncation: pick exactly representable values)."""
    import numpy as np
    return (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")


def safetensors_bytes(tensors, metadata=None):
    """A well-formed file from {name: (dtype, shape, raw bytes)}, packed in the given order. The header is
    padded with spaces (as the format allows) so the data section starts 8-aligned."""
    header, offset, data = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_safetensors(json.dumps(header).encode(), b"".join(data))


def raw_safetensors(header, data, length=None, pad=True):
    """A file from a header (bytes, or a dict dumped as JSON) and data, with an optional lying length."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


# ------------------------------------------------------------------------------------------------
# publishing


class Publisher:
    """A signing key made with drun.keygen, and models signed with drun.sign."""

    def __init__(self, drun, d, type="ed25519"):
        self.drun, self.dir = drun, Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "publisher.key"
        self.pub = self.dir / "publisher.key.pub"
        drun.keygen(type, str(self.key))

    def model(self, root, files, piece_size=1 << 20, signature=None, hash="sha256"):
        """Writes {relpath: bytes} under root and signs it: (root, signature path, artifact id)."""
        root = Path(root)
        for rel, content in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        sig = Path(signature) if signature else root.parent / (root.name + ".sig")
        self.drun.sign(str(root), str(self.key), signature=str(sig), piece_size=piece_size, hash=hash)
        vm = self.drun.verify(str(root), signature=str(sig), public_key=str(self.pub))
        return root, sig, vm.artifact_id
