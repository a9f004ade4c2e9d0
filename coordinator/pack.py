"""`edgemoe pack`: an mlx-lm model directory into the streamable packed layout."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model

from edgemoe.node.architecture import layer_index, read_config, routed_expert_modules
from edgemoe.node.compute import array_bytes
from edgemoe.node.dtypes import dtype_name
from edgemoe.node.errors import SourceModelError
from edgemoe.node.manifest import (
    DENSE_NAME,
    MANIFEST_NAME,
    RECORD_ALIGNMENT,
    TENSOR_ALIGNMENT,
    ExpertEntry,
    LayerSpec,
    Manifest,
    Segment,
    TensorSpec,
    align,
    fsync_dir,
)
from edgemoe.node.spec_check import model_fingerprint

from .progress import progress_bar
from .safetensors_io import StoredTensor, copy_range, index_files, write_header

log = logging.getLogger(__name__)

WEIGHT_GLOB = "model*.safetensors"


@dataclass
class PackResult:
    dst: Path
    layers: int
    experts: int
    expert_bytes: int
    dense_bytes: int
    seconds: float
    in_place: bool


def _quant_params(module: nn.Module) -> dict | None:
    if hasattr(module, "bits") and hasattr(module, "group_size"):
        return {"group_size": module.group_size, "bits": module.bits, "mode": getattr(module, "mode", "affine")}
    return None


def _load_source(src: Path) -> tuple[nn.Module, dict, list[Path]]:
    config = read_config(src)
    files = sorted(src.glob(WEIGHT_GLOB))
    if not files:
        raise SourceModelError(f"{src} has no {WEIGHT_GLOB} files: not an mlx-lm model directory")
    try:
        model, config = load_model(src, lazy=True, strict=True)
    except (ValueError, KeyError, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise SourceModelError(f"mlx-lm cannot load {src} ({detail}); check that it loads with mlx_lm.load") from exc
    return model, config, files


class _SourceReader:
    """Reads tensor bytes straight from the source files where pack can."""

    def __init__(self, files: list[Path]):
        self.index = index_files(files)
        self._fds: dict[Path, int] = {}

    def stored(self, name: str, arr: mx.array) -> StoredTensor | None:
        """The source tensor if it is the model's tensor unchanged (same name, dtype, shape)."""
        t = self.index.get(name)
        if t is not None and t.dtype == dtype_name(arr.dtype) and t.shape == list(arr.shape):
            return t
        return None

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _layer_spec(path: str, module: nn.Module, params: dict[str, mx.array]) -> LayerSpec:
    tensors = []
    offset = 0
    num_experts = 0
    for name, arr in sorted(params.items()):
        num_experts = num_experts or arr.shape[0]
        nbytes = arr.nbytes // arr.shape[0]
        tensors.append(TensorSpec(name, dtype_name(arr.dtype), list(arr.shape[1:]), offset, nbytes))
        offset = align(offset + nbytes, TENSOR_ALIGNMENT)
    quantization = {}
    for child_name, child in module.children().items():
        if isinstance(child, nn.Module) and (q := _quant_params(child)):
            quantization[child_name] = q
    return LayerSpec(
        layer=layer_index(path),
        module_path=path,
        num_experts=num_experts,
        record_bytes=offset,
        tensors=tensors,
        quantization=quantization,
    )


def _expert_segments(spec: LayerSpec, expert: int, full_names: dict[str, str], stored: dict[str, StoredTensor],
                     file_ids: dict[Path, int]) -> list[Segment]:
    segments = []
    for t in spec.tensors:
        s = stored[full_names[t.name]]
        segments.append(Segment(file_ids[s.path], s.offset + expert * t.nbytes, t.nbytes, t.offset))
    return segments


def _fill_record(spec: LayerSpec, expert: int, record: np.ndarray, sources: dict, reader: _SourceReader) -> None:
    view = record.data
    for t in spec.tensors:
        src = sources[t.name]
        dst = view[t.offset : t.offset + t.nbytes]
        if isinstance(src, StoredTensor):
            got = os.preadv(reader.fd(src.path), [dst], src.offset + expert * t.nbytes)
            if got != t.nbytes:
                raise SourceModelError(f"{src.path} is truncated; re-download the model")
        else:
            dst[:] = src[expert * t.nbytes : (expert + 1) * t.nbytes]


def _write_dense(path: Path, dense: dict[str, mx.array], reader: _SourceReader) -> tuple[int, str]:
    """Streams the dense tensors into one safetensors file; returns its size and sha256."""
    names = sorted(dense)
    entries = [(n, dtype_name(dense[n].dtype), list(dense[n].shape), dense[n].nbytes) for n in names]
    digest = hashlib.sha256()

    class _Hashing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            digest.update(data)
            self.f.write(data)

    with open(path, "wb") as f:
        out = _Hashing(f)
        write_header(out, entries, {"format": "mlx"})
        for name in names:
            stored = reader.stored(name, dense[name])
            if stored is not None:
                copy_range(reader.fd(stored.path), stored.offset, stored.nbytes, out)
            else:
                arr = dense[name]
                mx.eval(arr)
                out.write(array_bytes(arr))
                del arr
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size, digest.hexdigest()


def _copy_side_files(src: Path, dst: Path) -> None:
    """config, tokenizer, chat template and the like, unchanged."""
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)


def pack(src: Path, dst: Path, in_place: bool = False, force: bool = False, progress: bool = False) -> PackResult:
    src, dst = Path(src).resolve(), Path(dst).resolve()
    start = time.perf_counter()
    _recover_interrupted_swap(dst)
    if dst.exists() and not force:
        raise SourceModelError(f"{dst} already exists; pass --force to replace it or choose another DST")
    if dst == src:
        raise SourceModelError("DST must differ from SRC; with --in-place pack still writes a new directory")
    model, config, files = _load_source(src)
    modules = routed_expert_modules(model)
    if not modules:
        raise SourceModelError(
            f"{src} ({config['model_type']}) has no routed experts (SwitchGLU/SwitchMLP): not an MoE model; "
            "edgemoe streams MoE models only"
        )
    params = dict(tree_flatten(model.parameters()))
    reader = _SourceReader(files)
    work = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        manifest, expert_bytes = _pack_experts(modules, params, reader, work, in_place, progress)
        dense = {n: a for n, a in params.items() if not any(n.startswith(m + ".") for m, _ in modules)}
        dense_bytes, dense_sha = _write_dense(work / DENSE_NAME, dense, reader)
        _copy_side_files(src, work)
        manifest.model_type = config["model_type"]
        manifest.dense_quantization = {
            p: q
            for p, m in model.named_modules()
            if (q := _quant_params(m)) and not any(p.startswith(x + ".") for x, _ in modules)
        }
        manifest.fingerprint = _fingerprint(work / "config.json", dense_sha, manifest)
        # The manifest goes last and the directory appears under its name only
        # by rename: an interrupted pack never looks complete.
        (work / MANIFEST_NAME).write_text(manifest.to_json())
        fsync_dir(work)
        _install(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        reader.close()
    n_experts = sum(spec.num_experts for spec in manifest.layers)
    return PackResult(dst, len(manifest.layers), n_experts, expert_bytes, dense_bytes, time.perf_counter() - start,
                      in_place)


def _pack_experts(modules, params, reader: _SourceReader, work: Path, in_place: bool,
                  progress: bool) -> tuple[Manifest, int]:
    specs, sources_by_layer = [], []
    for path, module in modules:
        own = {n[len(path) + 1 :]: a for n, a in params.items() if n.startswith(path + ".")}
        spec = _layer_spec(path, module, own)
        stored = {name: reader.stored(f"{path}.{name}", arr) for name, arr in own.items()}
        if in_place and not all(stored.values()):
            missing = next(n for n, s in stored.items() if s is None)
            raise SourceModelError(
                f"--in-place needs experts stored stacked as mlx-lm saves them, but {path}.{missing} is not; "
                "convert the model with mlx_lm.convert or pack without --in-place"
            )
        specs.append(spec)
        sources_by_layer.append((own, stored))

    files: list[str] = []
    file_ids: dict[Path, int] = {}
    if in_place:
        # In place every tensor is stored (checked above): `is not None` only narrows the type.
        for path in sorted({s.path for _, stored in sources_by_layer for s in stored.values() if s is not None}):
            file_ids[path] = len(files)
            files.append(str(path))
    total = sum(spec.record_bytes * spec.num_experts for spec in specs)
    bar = progress_bar(total, "packing experts", always=progress)
    (work / "experts").mkdir()
    for (path, module), spec, (own, stored) in zip(modules, specs, sources_by_layer):
        sources: dict[str, StoredTensor | memoryview] = {}
        for name in own:
            if (s := stored[name]) is not None:
                sources[name] = s
            else:
                mx.eval(own[name])
                sources[name] = array_bytes(own[name])
        record = np.zeros(spec.record_bytes, dtype=np.uint8)
        if in_place:
            full = {name: f"{spec.module_path}.{name}" for name in own}
            by_full = {f"{spec.module_path}.{n}": s for n, s in stored.items() if s is not None}
            for e in range(spec.num_experts):
                _fill_record(spec, e, record, sources, reader)
                segments = _expert_segments(spec, e, full, by_full, file_ids)
                spec.experts.append(ExpertEntry(hashlib.sha256(record.data).hexdigest(), segments))
                bar.update(spec.record_bytes)
        else:
            name = f"experts/layer-{spec.layer:04d}.bin"
            file_id = len(files)
            files.append(name)
            stride = align(spec.record_bytes, RECORD_ALIGNMENT)
            with open(work / name, "wb") as f:
                for e in range(spec.num_experts):
                    record[:] = 0
                    _fill_record(spec, e, record, sources, reader)
                    f.seek(e * stride)
                    f.write(record.data)
                    segment = Segment(file_id, e * stride, spec.record_bytes, 0)
                    spec.experts.append(ExpertEntry(hashlib.sha256(record.data).hexdigest(), [segment]))
                    bar.update(spec.record_bytes)
                f.flush()
                os.fsync(f.fileno())
        # A tensor mlx-lm had to build (stacked from per-expert tensors, cast) is
        # materialised now: drop every reference to it, so pack holds one layer's
        # experts at a time, never the model's.
        module.update(tree_unflatten([(name, mx.zeros((0,))) for name in own]))
        for name in own:
            params.pop(f"{path}.{name}", None)
        own.clear()
        del sources
        mx.clear_cache()
    bar.close()
    manifest = Manifest(fingerprint="", model_type="", in_place=in_place, files=files, layers=specs)
    return manifest, total


def _fingerprint(config_path: Path, dense_sha: str, manifest: Manifest) -> str:
    manifest.dense_sha256 = dense_sha
    return model_fingerprint(config_path.read_bytes(), dense_sha, manifest.layers)


def _recover_interrupted_swap(dst: Path) -> None:
    """A pack killed between its two renames left the previous pack aside: put it back."""
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not dst.exists():
        os.rename(olds.pop(), dst)
        log.warning("restored %s from an interrupted pack", dst)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _install(work: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.rename(dst, old)
        try:
            os.rename(work, dst)
        except BaseException:
            os.rename(old, dst)  # the old pack stays in place
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, dst)
    fsync_dir(dst.parent)
