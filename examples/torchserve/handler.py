"""A TorchServe handler whose weights come through drun: verified, encrypted at rest, never plaintext on disk.

initialize() fetches the model from its origins (and/or peers) into drun's encrypted store, checking
every piece against the publisher's signature before it is sealed, then decrypts the .safetensors
weights straight from the store into the tensors' memory. A tampered or unsigned byte makes
initialize() raise drun.VerificationError, so TorchServe refuses to load the model instead of serving
it. handle() runs the model on a batch of JSON requests.

TorchServe loads a handler file by instantiating the one class it defines (so this module defines
exactly one) and calling initialize(context) once, then handle(data, context) per batch. The class
follows ts.torch_handler.base_handler.BaseHandler's interface without importing TorchServe. For the
"handler.py:handle" entry-point style there is also a module-level handle() function.

Package it with the config and the publisher's public key as extra files:

    torch-model-archiver --model-name tiny --version 1.0 --handler examples/torchserve/handler.py \\
        --extra-files drun.json,publisher.pub --export-path model_store

drun.json, in TorchServe's model_dir (relative paths are relative to model_dir):

    signature    URL or path of the signed bundle (model.sig)
    public_key   the publisher's public key (PEM); or ca_bundle for certificate-signed bundles
    origins      list of base URLs (http(s)://, s3://, file://) serving the model's files
    peers        optional list of HOST:PORT drun peers, with ca_cert, tls_cert, tls_key, token_file
    store        the node's drun store directory (shared by every process on the node)
    key_source   the store's node key: file:PATH, env:NAME or cmd:COMMAND
    weights      the .safetensors file (relative to the model) holding "weight" [out, in] and "bias" [out]
    connections, limit_rate   optional fetch tuning (pieces in flight, bytes/s)

Request bodies are JSON lists of input_features floats; each response is the list of outputs.
"""

import json
import os
from typing import Any, Dict, List, Optional

import drun
import torch

_CONFIG = "drun.json"


class DrunHandler:
    """A Linear model whose weights are fetched and verified by drun (BaseHandler's duck type)."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: Optional[torch.nn.Module] = None
        self.device = torch.device("cpu")
        self.artifact = None  # the verified artifact id the weights came from

    # ---------------------------------------------------------------------------------------------
    # TorchServe's interface

    def initialize(self, context) -> None:
        """Fetches, verifies and loads the weights. Raises drun.VerificationError for bytes or a bundle
        that do not match the publisher's signature, drun.ConfigError for a bad drun.json or key,
        drun.SourceError when no origin or peer delivers."""
        props = context.system_properties
        model_dir = props.get("model_dir") or "."
        config = self._read_config(model_dir)

        def here(path):  # config paths are relative to model_dir; URLs stay as they are
            return path if "://" in path else os.path.join(model_dir, path)

        trust = {"public_key": here(config["public_key"])} if config.get("public_key") else \
            {"ca_bundle": here(config["ca_bundle"])}
        peer_auth = {k: here(config[k]) for k in ("ca_cert", "tls_cert", "tls_key") if config.get(k)}
        if config.get("token_file"):
            with open(here(config["token_file"])) as f:
                peer_auth["token"] = f.read().strip()

        store = drun.Store(here(config["store"]), key_source=config["key_source"])
        # No out=: the weights stay sealed in the store and are decrypted into memory below.
        self.artifact = drun.fetch(
            store=store, signature=here(config["signature"]), **trust,
            origins=config.get("origins", []), peers=config.get("peers", []),
            connections=int(config.get("connections", 0)), limit_rate=int(config.get("limit_rate", 0)),
            **peer_auth)
        tensors = drun.load_safetensors(store, self.artifact, config["weights"], framework="torch")
        self.model = self._build_model(tensors)

        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu}")
            self.model.to(self.device)
        self.model.eval()
        self.initialized = True

    def handle(self, data: List[Dict[str, Any]], context) -> List[List[float]]:
        """One output list per request, in request order (TorchServe requires as many as it sent)."""
        batch = self.preprocess(data)
        return self.postprocess(self.inference(batch))

    # ---------------------------------------------------------------------------------------------
    # BaseHandler's steps

    def preprocess(self, data: List[Dict[str, Any]]) -> torch.Tensor:
        features = self.model.in_features
        rows = []
        for i, request in enumerate(data):
            body = request.get("body") if request.get("body") is not None else request.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode("utf-8")
            if isinstance(body, str):
                body = json.loads(body)
            if not (isinstance(body, list) and len(body) == features and
                    all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in body)):
                raise ValueError(f"request {i}: the body must be a JSON list of {features} numbers")
            rows.append(body)
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch)

    def postprocess(self, output: torch.Tensor) -> List[List[float]]:
        return output.cpu().tolist()

    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _read_config(model_dir: str) -> Dict[str, Any]:
        path = os.path.join(model_dir, _CONFIG)
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise drun.ConfigError(f"{path}: {e}", "invalid_argument", path) from e
        missing = [k for k in ("signature", "store", "key_source", "weights") if not config.get(k)]
        if not (config.get("public_key") or config.get("ca_bundle")):
            missing.append("public_key or ca_bundle")
        if not (config.get("origins") or config.get("peers")):
            missing.append("origins or peers")
        if missing:
            raise drun.ConfigError(f"{path}: missing {', '.join(missing)}", "invalid_argument", path)
        return config

    @staticmethod
    def _build_model(tensors: Dict[str, torch.Tensor]) -> torch.nn.Module:
        """A Linear layer over the file's tensors, without copying them: the parameters are the tensors
        load_safetensors decrypted into (skip_init leaves no randomly initialized weights behind)."""
        if set(tensors) != {"weight", "bias"}:
            raise drun.ConfigError(f'the weights must hold exactly "weight" and "bias", not {sorted(tensors)}',
                                   "invalid_argument")
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.dim() != 2 or bias.shape != (weight.shape[0],) or weight.dtype != bias.dtype:
            raise drun.ConfigError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not make a "
                                   "Linear layer", "invalid_argument")
        out_features, in_features = weight.shape
        model = torch.nn.utils.skip_init(torch.nn.Linear, in_features, out_features, dtype=weight.dtype)
        model.weight = torch.nn.Parameter(weight, requires_grad=False)
        model.bias = torch.nn.Parameter(bias, requires_grad=False)
        return model


# The "handler.py:handle" entry point: TorchServe calls it for every batch, without initialize().
_service = DrunHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
