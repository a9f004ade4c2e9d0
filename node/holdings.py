"""What a node holds on its disk: pushed experts of one or more models, in the packed layout.

Per model (by fingerprint) the node keeps `config.json`, the layer specs with every
expert's checksum, and one sparse file per MoE layer where expert `e` sits where
`edgemoe pack` would put it. Specs are checked (node/spec_check.py) before anything is
written, and again at start. An expert counts as held only after its bytes matched the
registered spec's checksum and were synced; every file a node keeps is replaced by
write, fsync, rename, fsync of the directory, so power loss at any moment leaves the
old or the new version. A model whose files are damaged anyway is moved aside at start
(`.quarantine-*`), with a log line, and the node starts without it.

What members can make a node spend on disk is bounded: `--disk-mb` over every model's
files at their full (sparse) logical size, `--max-models`, and a reserve of free space
checked with statvfs before each write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import msgpack

from .errors import EdgemoeError
from .limits import DISK_RESERVE_BYTES
from .manifest import RECORD_ALIGNMENT, Manifest, align, fsync_dir
from .spec_check import parse_spec

log = logging.getLogger(__name__)

HELD_INDEX = "held.msgpack"


class PushError(EdgemoeError):
    """A pushed expert does not fit the registered spec or does not match its checksum."""


class NodeFullError(PushError):
    """The node's disk quota, free space or model count does not allow this."""


def layer_specs_to_json(manifest: Manifest) -> bytes:
    """The layer specs a node needs, with each expert's checksum but none of the coordinator's paths."""
    layers = []
    for spec in manifest.layers:
        data = asdict(spec)
        data["experts"] = [e.checksum for e in spec.experts]
        layers.append(data)
    return json.dumps({"model_type": manifest.model_type, "dense_quantization": manifest.dense_quantization,
                       "dense_sha256": manifest.dense_sha256, "layers": layers}).encode()


def held_checksums_sha256(manifest: Manifest, pairs: Iterable[tuple[int, int]]) -> str:
    """One digest of the held experts' checksums ("layer expert checksum" lines in (layer,
    expert) order): a node reports it in Info, the coordinator recomputes it from its
    manifest. KeyError or IndexError for a pair the manifest does not have."""
    lines = (f"{layer} {expert} {manifest.layer(layer).experts[expert].checksum}\n" for layer, expert in sorted(pairs))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    """Replaces `path` so that power loss leaves the old or the new bytes, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def free_bytes(path: Path) -> int:
    """Space an unprivileged writer can still use on `path`'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _read_index(path: Path, manifest: Manifest) -> set[tuple[int, int]]:
    """The held index, each pair checked against the spec; ValueError if it is damaged."""
    if not path.exists():
        return set()
    try:
        pairs = msgpack.unpackb(path.read_bytes())
    except Exception as exc:  # msgpack raises several unrelated types on damaged input
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    experts = {spec.layer: spec.num_experts for spec in manifest.layers}
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and p[0] in experts and type(p[1]) is int and 0 <= p[1] < experts[p[0]]
        for p in pairs
    ):
        raise ValueError("not a list of (layer, expert) pairs of this model")
    return {(p[0], p[1]) for p in pairs}


class ModelHoldings:
    """One model's experts on this node's disk."""

    def __init__(self, root: Path, fingerprint: str, check_modules: bool = True):
        self.root = root
        self.fingerprint = fingerprint
        spec = parse_spec(fingerprint, (root / "config.json").read_bytes(), (root / "layers.json").read_bytes(),
                          check_modules)
        self.config = spec.config
        self.manifest = spec.manifest(fingerprint)
        self._lock = threading.Lock()
        index = root / HELD_INDEX
        try:
            self.held = _read_index(index, self.manifest)
        except ValueError as exc:
            _quarantine(index, f"its held index is damaged ({exc}); its experts will be pushed again")
            self.held = set()

    @property
    def disk_bytes(self) -> int:
        """The logical size of this model's expert files (sparse: what a full model would take)."""
        return sum(align(spec.record_bytes, RECORD_ALIGNMENT) * spec.num_experts for spec in self.manifest.layers)

    def record_bytes(self, layer: int, expert: int) -> int:
        """The registered size of one expert's record; PushError for an expert the model does not have."""
        try:
            spec = self.manifest.layer(layer)
        except KeyError:
            raise PushError(f"layer {layer} has no routed experts in model {self.fingerprint[:12]}") from None
        if not 0 <= expert < spec.num_experts:
            raise PushError(f"expert {expert} is out of range for layer {layer} ({spec.num_experts} experts)")
        return spec.record_bytes

    def store_expert(self, layer: int, expert: int, record: bytes) -> None:
        """Writes one expert's record where it belongs, if it matches the registered spec's checksum."""
        record_bytes = self.record_bytes(layer, expert)
        entry = self.manifest.layer(layer).experts[expert]
        if len(record) != record_bytes or hashlib.sha256(record).hexdigest() != entry.checksum:
            raise PushError(f"layer {layer} expert {expert} does not match its checksum; push it again")
        if free_bytes(self.root) < len(record) + DISK_RESERVE_BYTES:
            raise NodeFullError(f"the node's disk is full (keeps {DISK_RESERVE_BYTES >> 20} MiB free): "
                                f"layer {layer} expert {expert} not stored; free space on the node")
        path = self.root / self.manifest.files[entry.segments[0].file]
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, record, entry.segments[0].offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                self.held.add((layer, expert))
                self._save_index()
        except OSError as exc:
            with self._lock:
                self.held.discard((layer, expert))
            raise NodeFullError(f"layer {layer} expert {expert} not stored: {exc.strerror}") from None

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

    def snapshot(self) -> list[tuple[int, int]]:
        """The held (layer, expert) pairs, taken under the lock a push holds while it changes them."""
        with self._lock:
            return sorted(self.held)

    def _save_index(self) -> None:
        """Replaces the index of held experts durably (under the lock)."""
        write_durably(self.root / HELD_INDEX, msgpack.packb(sorted(self.held)))


def _quarantine(path: Path, why: str) -> None:
    """Moves a damaged file or model aside (a dot-name: never loaded again) and says so once."""
    aside = path.with_name(f".quarantine-{path.name}-{time.time_ns()}")
    os.replace(path, aside)
    log.warning("%s: %s; moved aside to %s", path, why, aside.name)


class NodeHoldings:
    """All models this node holds experts of, under `data_dir/models/<fingerprint>/`."""

    def __init__(self, data_dir: Path, disk_bytes: int = 2**62, max_models: int = 2**31):
        self.models_dir = Path(data_dir) / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.disk_bytes = disk_bytes
        self.max_models = max_models
        self.models: dict[str, ModelHoldings] = {}
        self._lock = threading.Lock()
        for root in sorted(self.models_dir.iterdir()):
            if root.name.startswith("."):
                if root.name.endswith(".partial"):  # a registration cut short: never complete
                    shutil.rmtree(root, ignore_errors=True)
                continue
            try:
                self.models[root.name] = ModelHoldings(root, root.name)
            except (EdgemoeError, OSError, ValueError) as exc:
                _quarantine(root, f"not a usable model ({exc})")

    def register(self, fingerprint: str, config_json: bytes, layers_json: bytes) -> ModelHoldings:
        """Checks a model's spec and makes room for its experts (sparse files of their final size);
        idempotent. SpecError for a bad spec, NodeFullError when the node's limits do not allow it."""
        with self._lock:
            if fingerprint in self.models:
                return self.models[fingerprint]
        spec = parse_spec(fingerprint, config_json, layers_json)
        manifest = spec.manifest(fingerprint)
        size = sum(align(s.record_bytes, RECORD_ALIGNMENT) * s.num_experts for s in manifest.layers)
        with self._lock:
            if fingerprint in self.models:
                return self.models[fingerprint]
            if len(self.models) >= self.max_models:
                raise NodeFullError(f"this node holds {len(self.models)} models, its --max-models; "
                                    "restart it with a higher --max-models or another --data-dir")
            used = sum(m.disk_bytes for m in self.models.values())
            if used + size > self.disk_bytes:
                raise NodeFullError(f"model {fingerprint[:12]} needs {size >> 20} MiB of disk; this node's --disk-mb "
                                    f"{self.disk_bytes >> 20} has {max(0, self.disk_bytes - used) >> 20} MiB left")
            if free_bytes(self.models_dir) < DISK_RESERVE_BYTES:
                raise NodeFullError(f"the node's disk is full (keeps {DISK_RESERVE_BYTES >> 20} MiB free)")
            work = self.models_dir / f".{fingerprint}.partial"
            try:
                shutil.rmtree(work, ignore_errors=True)
                (work / "experts").mkdir(parents=True)
                write_durably(work / "config.json", config_json)
                write_durably(work / "layers.json", layers_json)
                for name, layer in zip(manifest.files, manifest.layers):
                    with open(work / name, "wb") as f:
                        f.truncate(align(layer.record_bytes, RECORD_ALIGNMENT) * layer.num_experts)
                        os.fsync(f.fileno())
                fsync_dir(work / "experts")
                os.replace(work, self.models_dir / fingerprint)
                fsync_dir(self.models_dir)
            except OSError as exc:
                shutil.rmtree(work, ignore_errors=True)
                raise NodeFullError(f"cannot make room for model {fingerprint[:12]}: {exc.strerror}") from None
            # The spec was checked above: no need to build its modules again.
            model = self.models[fingerprint] = ModelHoldings(self.models_dir / fingerprint, fingerprint,
                                                             check_modules=False)
            return model

    def snapshot(self) -> dict[str, list[tuple[int, int]]]:
        """Every model's held pairs, taken under the locks pushes hold while they change them."""
        with self._lock:
            models = list(self.models.items())
        return {fingerprint: model.snapshot() for fingerprint, model in models}

    def get(self, fingerprint: str) -> ModelHoldings | None:
        with self._lock:
            return self.models.get(fingerprint)

    def free_disk_bytes(self) -> int:
        """What more this node can take: its file system's free space less the reserve, within --disk-mb."""
        with self._lock:
            used = sum(m.disk_bytes for m in self.models.values())
        return max(0, min(free_bytes(self.models_dir) - DISK_RESERVE_BYTES, self.disk_bytes - used))

