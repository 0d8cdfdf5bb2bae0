"""drun: verified, encrypted, fast distribution of AI models and other large artifacts.

Every byte drun hands over was verified against a signed manifest (OpenSSF Model Signing); every
piece it keeps is encrypted at rest (AES-256-GCM); peers talk over mutual TLS 1.3. Blocking calls
release the GIL; Ctrl-C cancels a fetch cleanly (what was stored stays stored).

    import drun
    drun.keygen("ed25519", "k.pem")
    drun.sign("model_dir", "k.pem", signature="model_dir/model.sig")
    vm = drun.verify("model_dir", signature="model_dir/model.sig", public_key="k.pem.pub")
    store = drun.Store("/var/cache/drun", key_source="file:/etc/drun/node.key")
    art = store.import_model("model_dir", signature="model_dir/model.sig", public_key="k.pem.pub")
    arrays = drun.load_safetensors(store, art, "model.safetensors")
"""

from typing import Any, Dict, Optional

from ._drun import (  # noqa: F401
    AuditLog,
    PeerServer,
    Store,
    VerifiedManifest,
    audit_verify,
    configure_logging,
    fetch,
    issue_token,
    jwks_for,
    keygen,
    metrics,
    rdma_status,
    set_audit_log,
    sign,
    verify,
    write_metrics_file,
)
from ._drun import _safetensors_layout, _safetensors_read
from ._errors import (  # noqa: F401
    AuthorizationError,
    ConfigError,
    Error,
    SourceError,
    StoreError,
    VerificationError,
)

__all__ = [
    "AuditLog", "AuthorizationError", "ConfigError", "Error", "PeerServer", "SourceError", "Store", "StoreError",
    "VerificationError", "VerifiedManifest", "audit_verify", "configure_logging", "fetch", "issue_token",
    "jwks_for", "keygen", "load_safetensors", "metadata", "metrics", "rdma_status", "set_audit_log", "sign",
    "verify", "write_metrics_file",
]

# safetensors dtypes as numpy spells them. numpy has no bfloat16: BF16 tensors come back as uint16
# holding the raw bits under framework="numpy" (torch gets real torch.bfloat16).
_NUMPY_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "<u2", "I16": "<i2", "F16": "<f2", "BF16": "<u2",
    "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
}


def load_safetensors(store: Store, artifact: str, file: str, framework: str = "numpy") -> Dict[str, Any]:
    """Reads a .safetensors file of a stored artifact into a dict of arrays, decrypting straight from
    the encrypted store into the arrays' memory (the plaintext never touches the disk).

    framework="numpy" gives numpy.ndarray views over one buffer; framework="torch" gives torch
    tensors sharing that buffer (torch must be importable). The header is parsed strictly by the
    C++ core: a malformed or hostile header raises drun.VerificationError. Every piece is
    authenticated before this returns.
    """
    import numpy as np

    if framework not in ("numpy", "torch"):
        raise ConfigError(f'framework must be "numpy" or "torch", not {framework!r}', "invalid_argument")
    data_size, tensors, _metadata = _safetensors_layout(store, artifact, file)
    buffer = np.empty(data_size, dtype=np.uint8)
    _safetensors_read(store, artifact, file, buffer)
    out: Dict[str, Any] = {}
    if framework == "torch":
        import torch

        torch_dtypes = {
            "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
            "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
            "F64": torch.float64,
        }
        for name, dtype, shape, begin, end in tensors:
            if dtype not in torch_dtypes:
                raise ConfigError(f"tensor {name}: torch has no {dtype} type", "unsupported")
            t = torch_dtypes[dtype]
            count = (end - begin) // torch.empty((), dtype=t).element_size()
            out[name] = torch.frombuffer(buffer, dtype=t, count=count, offset=begin).reshape(shape) if count else \
                torch.empty(shape, dtype=t)
        return out
    for name, dtype, shape, begin, end in tensors:
        out[name] = buffer[begin:end].view(np.dtype(_NUMPY_DTYPES[dtype])).reshape(shape)
    return out


def metadata(store: Store, artifact: str, file: str) -> Optional[Dict[str, str]]:
    """The "__metadata__" of a stored .safetensors file (strings only), read and checked."""
    return _safetensors_layout(store, artifact, file)[2]
