"""A pushed model spec, checked before a node keeps or computes with any of it.

The spec a coordinator pushes (`config.json` and the layer specs with every expert's
checksum) comes from a cluster member, who may lie. The node trusts it only as far as
it can check it:

- **The fingerprint is recomputed.** A model's fingerprint (`edgemoe pack`) is
  sha256(config.json bytes, the dense file's sha256 in hex, then per layer
  json([layer, module_path, tensors]) followed by its experts' checksums). The spec
  carries `dense_sha256`, so the node recomputes the fingerprint and refuses a spec
  whose checksums, tensor layout or config are not the ones the fingerprint names:
  a member cannot register a real model's fingerprint with checksums of its own.
- **What the fingerprint does not cover is bound by what it does.** A layer's
  quantization (bits, group size, mode) must give mlx-lm's module, built from the
  fingerprinted config, exactly the spec's tensor names and shapes; `record_bytes` is
  the end of the last tensor, as pack lays records out.
- **Every number is checked** (types, dtype whitelist, nbytes = prod(shape) x itemsize,
  tensors inside the record and not overlapping, one checksum per expert) and bounded
  (node/limits.py), so a hostile spec is one clear error, never an allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .architecture import build_model, routed_expert_modules
from .dtypes import NUMPY_STORAGE
from .errors import EdgemoeError, UnsupportedArchitectureError
from .limits import MAX_EXPERTS_PER_LAYER, MAX_MODEL_LAYERS, MAX_RECORD_BYTES, MAX_SPEC_BYTES, MAX_TENSORS_PER_LAYER
from .manifest import RECORD_ALIGNMENT, TENSOR_ALIGNMENT, ExpertEntry, LayerSpec, Manifest, Segment, TensorSpec, align

QUANTIZATION_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
_HEX = frozenset("0123456789abcdef")


class SpecError(EdgemoeError):
    """A pushed model spec is malformed, out of bounds, or not the model its fingerprint names."""


@dataclass
class ModelSpecData:
    config: dict
    model_type: str
    dense_quantization: dict
    dense_sha256: str
    layers: list[LayerSpec]

    def manifest(self, fingerprint: str) -> Manifest:
        files = [f"experts/layer-{spec.layer:04d}.bin" for spec in self.layers]
        return Manifest(fingerprint, self.model_type, False, files, self.layers, self.dense_quantization)


def model_fingerprint(config_json: bytes, dense_sha256: str, layers: list[LayerSpec]) -> str:
    """The model's fingerprint, as `edgemoe pack` writes it in the manifest."""
    digest = hashlib.sha256()
    digest.update(config_json)
    digest.update(dense_sha256.encode())
    for spec in layers:
        digest.update(json.dumps([spec.layer, spec.module_path, [asdict(t) for t in spec.tensors]]).encode())
        for entry in spec.experts:
            digest.update(entry.checksum.encode())
    return digest.hexdigest()


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def parse_spec(fingerprint: str, config_json: bytes, layers_json: bytes, check_modules: bool = True) -> ModelSpecData:
    """The checked spec; raises SpecError saying what is wrong."""
    if not is_sha256(fingerprint):
        raise SpecError(f"model fingerprint {fingerprint[:70]!r} is not a sha256 hex digest")
    short = fingerprint[:12]
    if len(config_json) + len(layers_json) > MAX_SPEC_BYTES:
        raise SpecError(f"model spec for {short} is over {MAX_SPEC_BYTES >> 20} MiB")
    try:
        config = json.loads(config_json.decode("utf-8"))
        data = json.loads(layers_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"model spec for {short} is not UTF-8 JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise SpecError(f"config.json of {short} is not a JSON object with a model_type")
    try:
        spec = _parse_layers(data, config)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"model spec for {short} is malformed ({type(exc).__name__}: {exc})") from None
    if model_fingerprint(config_json, spec.dense_sha256, spec.layers) != fingerprint:
        raise SpecError(f"model spec does not hash to its fingerprint {short}: its config, layout or checksums "
                        "are not that model's")
    if check_modules:
        _check_modules(spec, short)
    return spec


def _int(value: object, what: str, low: int = 0, high: int = 2**31) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} is {value!r}, not an integer in [{low}, {high}]")
    return value


def _parse_layers(data: object, config: dict) -> ModelSpecData:
    if not isinstance(data, dict):
        raise TypeError("the layer specs are not a JSON object")
    dense_sha = data.get("dense_sha256")
    if not is_sha256(dense_sha):
        raise ValueError("no dense_sha256 (a pack by an older edgemoe: repack it with `edgemoe pack --force`)")
    raw_layers = data["layers"]
    if not isinstance(raw_layers, list) or not 0 < len(raw_layers) <= MAX_MODEL_LAYERS:
        raise ValueError(f"need 1 to {MAX_MODEL_LAYERS} layers")
    layers: list[LayerSpec] = []
    for raw in raw_layers:
        layers.append(_parse_layer(raw, len(layers)))
    if len({spec.layer for spec in layers}) != len(layers):
        raise ValueError("a layer is listed twice")
    quant = data.get("dense_quantization", {})
    if not isinstance(quant, dict) or not isinstance(data["model_type"], str):
        raise TypeError("model_type or dense_quantization has the wrong type")
    return ModelSpecData(config, data["model_type"], quant, str(dense_sha), layers)


def _parse_layer(raw: dict, file_index: int) -> LayerSpec:
    layer = _int(raw["layer"], "layer")
    where = f"layer {layer}"
    num_experts = _int(raw["num_experts"], f"{where} num_experts", 1, MAX_EXPERTS_PER_LAYER)
    record_bytes = _int(raw["record_bytes"], f"{where} record_bytes", 1, MAX_RECORD_BYTES)
    checksums = raw["experts"]
    if not isinstance(checksums, list) or len(checksums) != num_experts or not all(map(is_sha256, checksums)):
        raise ValueError(f"{where} needs one sha256 checksum per expert ({num_experts})")
    raw_tensors = raw["tensors"]
    if not isinstance(raw_tensors, list) or not 0 < len(raw_tensors) <= MAX_TENSORS_PER_LAYER:
        raise ValueError(f"{where} needs 1 to {MAX_TENSORS_PER_LAYER} tensors")
    tensors = [_parse_tensor(t, where) for t in raw_tensors]
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise ValueError(f"{where} tensor {t.name} overlaps the one before it")
        end = t.offset + t.nbytes
    if record_bytes != align(end, TENSOR_ALIGNMENT):
        raise ValueError(f"{where} record_bytes {record_bytes} is not its tensors' end "
                         f"({align(end, TENSOR_ALIGNMENT)})")
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError(f"{where} names a tensor twice")
    quantization = raw["quantization"]
    if not isinstance(quantization, dict) or not all(
        isinstance(k, str) and isinstance(q, dict) and set(q) <= {"group_size", "bits", "mode"}
        and _int(q["group_size"], "group_size", 1, 1024) and _int(q["bits"], "bits", 1, 8)
        and q.get("mode", "affine") in QUANTIZATION_MODES
        for k, q in quantization.items()
    ):
        raise ValueError(f"{where} quantization is malformed")
    module_path = raw["module_path"]
    if not isinstance(module_path, str) or len(module_path) > 256:
        raise TypeError(f"{where} module_path is not a short string")
    stride = align(record_bytes, RECORD_ALIGNMENT)
    experts = [ExpertEntry(c, [Segment(file_index, e * stride, record_bytes, 0)]) for e, c in enumerate(checksums)]
    return LayerSpec(layer, module_path, num_experts, record_bytes, tensors, quantization, experts)


def _parse_tensor(raw: dict, where: str) -> TensorSpec:
    name, dtype, shape = raw["name"], raw["dtype"], raw["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise TypeError(f"{where}: a tensor name is not a short string")
    if dtype not in NUMPY_STORAGE:
        raise ValueError(f"{where} tensor {name}: dtype {dtype!r} is not one of {sorted(NUMPY_STORAGE)}")
    if not isinstance(shape, list) or len(shape) > 4:
        raise ValueError(f"{where} tensor {name}: shape must be a list of at most 4 sizes")
    dims = [_int(d, f"{where} tensor {name} size", 1, MAX_RECORD_BYTES) for d in shape]
    nbytes = _int(raw["nbytes"], f"{where} tensor {name} nbytes", 1, MAX_RECORD_BYTES)
    if nbytes != math.prod(dims) * NUMPY_STORAGE[dtype]().itemsize:
        raise ValueError(f"{where} tensor {name}: nbytes {nbytes} is not its shape {dims} x {dtype}'s size")
    offset = _int(raw["offset"], f"{where} tensor {name} offset", 0, MAX_RECORD_BYTES)
    return TensorSpec(name, dtype, dims, offset, nbytes)


def _check_modules(spec: ModelSpecData, short: str) -> None:
    """mlx-lm's module for each layer, quantized as the spec says, has exactly the spec's tensors."""
    layers = spec.config.get("num_hidden_layers", 0)
    if type(layers) is not int or not 0 <= layers <= MAX_MODEL_LAYERS:
        raise SpecError(f"config.json of {short}: num_hidden_layers {layers!r} is not 0 to {MAX_MODEL_LAYERS}")
    try:
        modules = dict(routed_expert_modules(build_model(spec.config)))
    except UnsupportedArchitectureError as exc:
        raise SpecError(f"model {short}: {exc}") from None
    except Exception as exc:  # mlx-lm's constructors raise anything on a bad config
        raise SpecError(f"config.json of {short} does not build its model ({type(exc).__name__}: {exc})") from None
    for layer in spec.layers:
        template = modules.get(layer.module_path)
        if template is None:
            raise SpecError(f"model {short} has no routed experts at {layer.module_path}")
        try:
            for child, q in layer.quantization.items():
                template[child] = template[child].to_quantized(group_size=q["group_size"], bits=q["bits"],
                                                               mode=q.get("mode", "affine"))
        except Exception as exc:  # a quantization mlx refuses for this module
            raise SpecError(f"model {short} layer {layer.layer}: quantization refused ({exc})") from None
        params: dict[str, mx.array] = dict(tree_flatten(template.parameters()))
        expected = {name: (list(a.shape[1:]), a.shape[0]) for name, a in params.items()}
        got = {t.name: (t.shape, layer.num_experts) for t in layer.tensors}
        if expected != got:
            raise SpecError(f"model {short} layer {layer.layer}: the tensors and quantization are not those of its "
                            "config's experts")
