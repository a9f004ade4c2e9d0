"""The packed model's manifest: where every expert's bytes are and how to read them."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ManifestError

FORMAT_NAME = "edgemoe-packed"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DENSE_NAME = "dense.safetensors"
CHECKSUM_ALGORITHM = "sha256"
# Expert records start on 16 KiB boundaries (the Apple SSD page) so one expert is
# one aligned pread; tensors inside a record on 64 bytes for aligned views.
RECORD_ALIGNMENT = 16384
TENSOR_ALIGNMENT = 64


@dataclass
class TensorSpec:
    """One tensor of one expert, e.g. `gate_proj.scales`, at `offset` in the record."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


@dataclass
class Segment:
    """`length` bytes at `offset` of `files[file]` go to `record_offset` in the record."""

    file: int
    offset: int
    length: int
    record_offset: int


@dataclass
class ExpertEntry:
    checksum: str
    segments: list[Segment]


@dataclass
class LayerSpec:
    """The routed experts of one MoE layer."""

    layer: int
    module_path: str
    num_experts: int
    record_bytes: int
    tensors: list[TensorSpec]
    quantization: dict[str, dict]
    experts: list[ExpertEntry] = field(default_factory=list)


@dataclass
class Manifest:
    fingerprint: str
    model_type: str
    in_place: bool
    files: list[str]
    layers: list[LayerSpec]
    dense_quantization: dict[str, dict] = field(default_factory=dict)
    # sha256 of dense.safetensors, one input of the fingerprint: nodes recompute the
    # fingerprint with it (node/spec_check.py). Empty in packs of older versions.
    dense_sha256: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    def layer(self, layer: int) -> LayerSpec:
        for spec in self.layers:
            if spec.layer == layer:
                return spec
        raise KeyError(layer)

    @property
    def expert_bytes(self) -> int:
        """Bytes of the largest expert record: the unit a cache budget is counted in."""
        return max(spec.record_bytes for spec in self.layers)

    @property
    def total_expert_bytes(self) -> int:
        return sum(spec.record_bytes * spec.num_experts for spec in self.layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def manifest_from_dict(data: dict) -> Manifest:
    layers = []
    for layer in data["layers"]:
        experts = [
            ExpertEntry(e["checksum"], [Segment(**s) for s in e["segments"]])
            for e in layer["experts"]
        ]
        tensors = [TensorSpec(**t) for t in layer["tensors"]]
        layers.append(
            LayerSpec(
                layer=layer["layer"],
                module_path=layer["module_path"],
                num_experts=layer["num_experts"],
                record_bytes=layer["record_bytes"],
                tensors=tensors,
                quantization=layer["quantization"],
                experts=experts,
            )
        )
    return Manifest(
        fingerprint=data["fingerprint"],
        model_type=data["model_type"],
        in_place=data["in_place"],
        files=data["files"],
        layers=layers,
        dense_quantization=data["dense_quantization"],
        dense_sha256=data.get("dense_sha256", ""),
        format=data["format"],
        format_version=data["format_version"],
        checksum_algorithm=data["checksum_algorithm"],
    )


def read_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not Path(model_dir).is_dir():
        raise ManifestError(f"{model_dir}: no such directory; pass a directory written by `edgemoe pack`")
    if not path.exists():
        raise ManifestError(
            f"{path} is missing: {model_dir} is not a packed model (or its pack was interrupted); "
            "run `edgemoe pack SRC DST` first"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is unreadable ({exc}); pack the model again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not an edgemoe manifest; pack the model again")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {version}, this edgemoe reads version {FORMAT_VERSION}; "
            "repack the model with this edgemoe (`edgemoe pack SRC DST --force`)"
        )
    try:
        manifest = manifest_from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is damaged (missing {exc}); pack the model again") from exc
    for spec in manifest.layers:
        if len(spec.experts) != spec.num_experts or any(
            not 0 <= seg.file < len(manifest.files) for e in spec.experts for seg in e.segments
        ):
            raise ManifestError(
                f"{path} is damaged (layer {spec.layer} lists {len(spec.experts)} of its "
                f"{spec.num_experts} experts, or names files it does not have); pack the model again"
            )
    return manifest


def resolve_file(model_dir: Path, name: str) -> Path:
    """Expert files are stored relative to the packed dir, or absolute for --in-place."""
    path = Path(name)
    return path if path.is_absolute() else Path(model_dir) / path


def align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
