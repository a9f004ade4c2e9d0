"""What a node holds on its disk: pushed experts of one or more models, in the packed layout.

Per model (by fingerprint) the node keeps `config.json`, the layer specs with every
expert's checksum, and one sparse file per MoE layer where expert `e` sits where
`edgemoe pack` would put it. An expert counts as held only after its bytes matched
the checksum and were synced; the index of held experts is a msgpack file replaced
atomically, so a node restarted at any moment keeps what it fully received.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

import msgpack

from .errors import EdgemoeError
from .manifest import RECORD_ALIGNMENT, ExpertEntry, LayerSpec, Manifest, Segment, TensorSpec, align

HELD_INDEX = "held.msgpack"


class PushError(EdgemoeError):
    """A pushed expert or model spec is malformed or does not match its checksum."""


def layer_specs_to_json(manifest: Manifest) -> bytes:
    """The layer specs a node needs, with each expert's checksum but none of the coordinator's paths."""
    layers = []
    for spec in manifest.layers:
        data = asdict(spec)
        data["experts"] = [e.checksum for e in spec.experts]
        layers.append(data)
    return json.dumps({"model_type": manifest.model_type, "dense_quantization": manifest.dense_quantization,
                       "layers": layers}).encode()


def _layers_from_json(raw: bytes) -> tuple[str, dict, list[LayerSpec]]:
    data = json.loads(raw)
    layers: list[LayerSpec] = []
    for layer in data["layers"]:
        stride = align(layer["record_bytes"], RECORD_ALIGNMENT)
        experts = [
            ExpertEntry(checksum, [Segment(len(layers), e * stride, layer["record_bytes"], 0)])
            for e, checksum in enumerate(layer["experts"])
        ]
        layers.append(LayerSpec(
            layer=int(layer["layer"]), module_path=str(layer["module_path"]), num_experts=int(layer["num_experts"]),
            record_bytes=int(layer["record_bytes"]), tensors=[TensorSpec(**t) for t in layer["tensors"]],
            quantization=dict(layer["quantization"]), experts=experts,
        ))
    return str(data["model_type"]), dict(data["dense_quantization"]), layers


class ModelHoldings:
    """One model's experts on this node's disk."""

    def __init__(self, root: Path, fingerprint: str):
        self.root = root
        self.fingerprint = fingerprint
        self.config = json.loads((root / "config.json").read_text())
        model_type, dense_quantization, layers = _layers_from_json((root / "layers.json").read_bytes())
        files = [f"experts/layer-{spec.layer:04d}.bin" for spec in layers]
        self.manifest = Manifest(fingerprint, model_type, False, files, layers, dense_quantization)
        self._lock = threading.Lock()
        index = root / HELD_INDEX
        self.held: set[tuple[int, int]] = (
            {tuple(k) for k in msgpack.unpackb(index.read_bytes())} if index.exists() else set()
        )

    def store_expert(self, layer: int, expert: int, record: bytes) -> None:
        """Writes one expert's record where it belongs, if it matches the manifest's checksum."""
        try:
            spec = self.manifest.layer(layer)
        except KeyError:
            raise PushError(f"layer {layer} has no routed experts in model {self.fingerprint[:12]}") from None
        if not 0 <= expert < spec.num_experts:
            raise PushError(f"expert {expert} is out of range for layer {layer} ({spec.num_experts} experts)")
        entry = spec.experts[expert]
        if len(record) != spec.record_bytes or hashlib.sha256(record).hexdigest() != entry.checksum:
            raise PushError(f"layer {layer} expert {expert} does not match its checksum; push it again")
        path = self.root / self.manifest.files[entry.segments[0].file]
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, record, entry.segments[0].offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self.held.add((layer, expert))
            self._save_index()

    def drop_corrupted(self, layer: int, experts: set[int]) -> list[int]:
        """Re-reads these held experts of a layer and stops holding those whose bytes on disk no
        longer match their checksum (the disk went bad since they were pushed); returns them."""
        spec = self.manifest.layer(layer)
        bad = []
        with open(self.root / self.manifest.files[spec.experts[0].segments[0].file], "rb") as f:
            for expert in sorted(e for e in experts if (layer, e) in self.held):
                entry = spec.experts[expert]
                f.seek(entry.segments[0].offset)
                if hashlib.sha256(f.read(spec.record_bytes)).hexdigest() != entry.checksum:
                    bad.append(expert)
        if bad:
            with self._lock:
                self.held.difference_update((layer, e) for e in bad)
                self._save_index()
        return bad

    def _save_index(self) -> None:
        """Replaces the index of held experts atomically (under the lock)."""
        tmp = self.root / f"{HELD_INDEX}.tmp"
        tmp.write_bytes(msgpack.packb(sorted(self.held)))
        os.replace(tmp, self.root / HELD_INDEX)


class NodeHoldings:
    """All models this node holds experts of, under `data_dir/models/<fingerprint>/`."""

    def __init__(self, data_dir: Path):
        self.models_dir = Path(data_dir) / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, ModelHoldings] = {}
        for root in sorted(self.models_dir.iterdir()):
            if (root / "layers.json").exists():
                self.models[root.name] = ModelHoldings(root, root.name)

    def register(self, fingerprint: str, config_json: bytes, layers_json: bytes) -> ModelHoldings:
        """Makes room for a model's experts (sparse files of their final size); idempotent."""
        if fingerprint in self.models:
            return self.models[fingerprint]
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise PushError(f"model fingerprint {fingerprint[:70]!r} is not a sha256 hex digest")
        try:
            json.loads(config_json)
            _, _, layers = _layers_from_json(layers_json)
        except (ValueError, KeyError, TypeError) as exc:
            raise PushError(f"model spec for {fingerprint[:12]} is malformed ({exc})") from exc
        work = self.models_dir / f".{fingerprint}.partial"
        (work / "experts").mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_bytes(config_json)
        (work / "layers.json").write_bytes(layers_json)
        for spec in layers:
            size = align(spec.record_bytes, RECORD_ALIGNMENT) * spec.num_experts
            with open(work / f"experts/layer-{spec.layer:04d}.bin", "wb") as f:
                f.truncate(size)
        os.replace(work, self.models_dir / fingerprint)
        self.models[fingerprint] = ModelHoldings(self.models_dir / fingerprint, fingerprint)
        return self.models[fingerprint]
