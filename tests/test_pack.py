"""`edgemoe pack`: what it writes, that it writes it atomically, and in bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPT, REPO, SUPPORTED_ARCHS, cli_env, encode, mlx_lm_tokens, run_cli, write_large_moe_source
from mlx.utils import tree_flatten

from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.coordinator.pack import pack
from edgemoe.node.compute import record_to_arrays
from edgemoe.node.errors import ManifestError, SourceModelError
from edgemoe.node.manifest import (
    DENSE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    RECORD_ALIGNMENT,
    TENSOR_ALIGNMENT,
    read_manifest,
)
from edgemoe.node.store import ExpertStore

QUANT = [pytest.param(True, id="q4"), pytest.param(False, id="f32")]
MiB = 2**20


def mlx_lm_routed_experts(model) -> dict[str, object]:
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    return {p: m for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))}


def leftovers(dst) -> list:
    return [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def as_numpy(arr: mx.array) -> np.ndarray:
    """Bit patterns, so the comparison is exact for every dtype (bfloat16 included)."""
    if arr.dtype in (mx.bfloat16, mx.float16):
        arr = arr.view(mx.uint16)
    return np.array(arr)


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_manifest_describes_mlx_lms_experts(models, arch, quantized):
    src = models.src(arch, quantized)
    dst = models.packed(arch, quantized)
    m = read_manifest(dst)
    raw = json.loads((dst / MANIFEST_NAME).read_text())
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    assert m.model_type == json.loads((src / "config.json").read_text())["model_type"]
    assert m.in_place is False
    assert len(m.fingerprint) == 64 and int(m.fingerprint, 16) >= 0

    model, _ = models.mlx_lm_model(src)
    routed = mlx_lm_routed_experts(model)
    assert {spec.module_path for spec in m.layers} == set(routed)
    for spec in m.layers:
        module = routed[spec.module_path]
        params = dict(tree_flatten(module.parameters()))
        assert {t.name for t in spec.tensors} == set(params)
        assert spec.num_experts == len(spec.experts) == next(iter(params.values())).shape[0]
        end = 0
        for t in sorted(spec.tensors, key=lambda t: t.offset):
            assert t.offset % TENSOR_ALIGNMENT == 0
            assert t.offset >= end
            assert list(params[t.name].shape[1:]) == t.shape
            end = t.offset + t.nbytes
        assert end <= spec.record_bytes
        for child, q in spec.quantization.items():
            assert (q["group_size"], q["bits"]) == (module[child].group_size, module[child].bits)
        assert bool(spec.quantization) == quantized
        for entry in spec.experts:
            # A full pack: one expert is one aligned range of one per-layer file.
            assert len(entry.segments) == 1
            seg = entry.segments[0]
            assert seg.offset % RECORD_ALIGNMENT == 0
            assert seg.length == spec.record_bytes and seg.record_offset == 0
            assert not os.path.isabs(m.files[seg.file])
    # Records never overlap inside a file.
    ranges = sorted((s.file, s.offset, s.offset + s.length)
                    for spec in m.layers for e in spec.experts for s in e.segments)
    for (f1, _, end1), (f2, start2, _) in zip(ranges, ranges[1:]):
        assert f1 != f2 or end1 <= start2


@pytest.mark.parametrize("in_place", [False, True], ids=["full", "in-place"])
@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_packed_bytes_equal_mlx_lms_weights(models, arch, quantized, in_place):
    """Every expert read back through the store, and the dense file, hold mlx-lm's tensors bit for bit."""
    src = models.src(arch, quantized)
    dst = models.packed(arch, quantized, in_place=in_place)
    m = read_manifest(dst)
    model, _ = models.mlx_lm_model(src)
    routed = mlx_lm_routed_experts(model)
    with ExpertStore(dst, m) as store:
        for spec in m.layers:
            params = dict(tree_flatten(routed[spec.module_path].parameters()))
            for e in range(spec.num_experts):
                record = store.read(spec.layer, e)
                assert hashlib.sha256(record).hexdigest() == spec.experts[e].checksum
                got = record_to_arrays(spec, record)
                for name, stacked in params.items():
                    assert np.array_equal(as_numpy(got[name]), as_numpy(stacked[e])), (spec.layer, e, name)
    dense = mx.load(str(dst / DENSE_NAME))
    expected = {n: a for n, a in tree_flatten(model.parameters()) if not any(n.startswith(p + ".") for p in routed)}
    assert set(dense) == set(expected)
    for name, arr in expected.items():
        assert dense[name].dtype == arr.dtype
        assert np.array_equal(as_numpy(dense[name]), as_numpy(arr)), name
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / side).read_bytes() == (src / side).read_bytes()


@pytest.mark.parametrize("quantized", QUANT)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_in_place_pack_has_the_full_packs_checksums(models, arch, quantized):
    src = models.src(arch, quantized)
    full = read_manifest(models.packed(arch, quantized))
    inplace = read_manifest(models.packed(arch, quantized, in_place=True))
    assert inplace.in_place is True
    assert [s.module_path for s in full.layers] == [s.module_path for s in inplace.layers]
    for a, b in zip(full.layers, inplace.layers):
        assert [e.checksum for e in a.experts] == [e.checksum for e in b.experts]
        assert len({e.checksum for e in a.experts}) == a.num_experts  # the experts really differ
    # In place: the expert ranges are in the source's own safetensors files; nothing copied.
    assert all(os.path.isabs(f) and os.path.dirname(f) == str(src.resolve()) for f in inplace.files)
    assert not list((models.packed(arch, quantized, in_place=True) / "experts").glob("*.bin"))


def write_shards(src, dst, shards: int = 3):
    """`src` with its weights in `shards` files, named and indexed as mlx-lm's `save_model`
    names big models' shards. Tensors are dealt out in turn, so one expert's tensors
    (gate, up, down, their scales) sit in different files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i::shards]}
        mx.save_safetensors(str(dst / file), part, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return dst


@pytest.mark.parametrize("in_place", [False, True], ids=["full", "in-place"])
@pytest.mark.parametrize("arch, quantized", [("qwen3_moe", True), ("deepseek_v3", True), ("gpt_oss", False)])
def test_sharded_source_same_tokens_as_mlx_lm(models, tmp_path, arch, quantized, in_place):
    """A source in several safetensors shards (every large model on the Hub) packs, in full
    and in place, to mlx-lm's tokens."""
    src = write_shards(models.src(arch, quantized), tmp_path / "sharded")
    assert len(list(src.glob("model-*-of-00003.safetensors"))) == 3
    assert not (src / "model.safetensors").exists()
    dst = tmp_path / "packed"
    pack(src, dst, in_place=in_place)
    m = read_manifest(dst)
    if in_place:
        # Experts are read from all three shards, and single experts from several of them.
        assert sorted(os.path.basename(f) for f in m.files) == sorted(p.name for p in src.glob("model-*.safetensors"))
        assert any(len({s.file for s in e.segments}) > 1 for layer in m.layers for e in layer.experts)
    prompt = encode(models, models.src(arch, quantized), PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt)
    # The shards hold the same model: the same tokens as the one-file source.
    assert expected == mlx_lm_tokens(models.src(arch, quantized), prompt, models=models)[0]
    for budget in (m.expert_bytes, m.total_expert_bytes):
        sm = load_streaming_model(dst, cache_bytes=budget)
        try:
            assert generate(sm, prompt, max_tokens=len(expected)).token_ids == expected
        finally:
            sm.close()


def test_fingerprint_stable_across_packs_and_differs_between_models(models, tmp_path):
    src = models.src("qwen3_moe", True)
    pack(src, tmp_path / "a")
    pack(src, tmp_path / "b")
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint == read_manifest(models.packed("qwen3_moe", True)).fingerprint
    other = read_manifest(models.packed("qwen3_moe", True, seed=1))
    assert other.fingerprint != a.fingerprint
    assert read_manifest(models.packed("qwen3_moe", False)).fingerprint != a.fingerprint


def test_store_reads_one_expert_with_one_pread(models, monkeypatch):
    dst = models.packed("deepseek_v3", True)
    m = read_manifest(dst)
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset, *rest):
        calls.append((fd, len(buffers), offset))
        return real(fd, buffers, offset, *rest)

    warm_page_cache(expert_paths(dst, m))
    with ExpertStore(dst, m) as store:
        monkeypatch.setattr(os, "preadv", counting)
        for spec in m.layers:
            for e in (0, spec.num_experts - 1):
                calls.clear()
                store.read(spec.layer, e)
                assert len(calls) == 1
                assert calls[0][2] % RECORD_ALIGNMENT == 0
        calls.clear()
        spec = m.layers[0]
        store.read_many_into(spec.layer, {e: [memoryview(bytearray(t.nbytes)) for t in spec.tensors] for e in range(4)})
        assert len(calls) == 4
    inplace_dir = models.packed("deepseek_v3", True, in_place=True)
    inplace = read_manifest(inplace_dir)
    # A small read is tried from the page cache first (RWF_NOWAIT) and read again whole after
    # the batch's other tries if part of it is not there: with the source's pages in, it is one try.
    warm_page_cache(expert_paths(inplace_dir, inplace))
    with ExpertStore(inplace_dir, inplace) as store:
        calls.clear()
        store.read(inplace.layers[0].layer, 0)
        # In place an expert is one range per tensor (gate/up/down x weight/scales/biases).
        assert len(calls) == len(inplace.layers[0].tensors)


# --------------------------------------------------------------------------- atomicity


def assert_no_usable_partial(dst):
    for left in leftovers(dst):
        with pytest.raises(ManifestError):
            read_manifest(left)


@pytest.mark.parametrize("where", ["_write_dense", "_fill_record", "_copy_side_files", "_install"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_pack_leaves_nothing(models, tmp_path, monkeypatch, where, exc):
    import edgemoe.coordinator.pack as pack_module

    src = models.src("qwen3_moe", True)
    dst = tmp_path / "packed"
    real = getattr(pack_module, where)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        # midway through the experts; at once elsewhere
        if where != "_fill_record" or calls["n"] == 20:
            raise exc("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(pack_module, where, interrupted)
    with pytest.raises(exc, match="simulated"):
        pack(src, dst)
    assert not dst.exists()
    assert leftovers(dst) == []
    with pytest.raises(ManifestError):
        load_streaming_model(dst)


def test_interrupted_force_repack_keeps_the_old_pack(models, tmp_path, monkeypatch):
    import edgemoe.coordinator.pack as pack_module

    old_src, new_src = models.src("qwen3_moe", True), models.src("qwen3_moe", True, seed=1)
    dst = tmp_path / "packed"
    pack(old_src, dst)
    before = read_manifest(dst).fingerprint

    def fail(*args, **kwargs):
        raise RuntimeError("simulated interruption")

    monkeypatch.setattr(pack_module, "_write_dense", fail)
    with pytest.raises(RuntimeError):
        pack(new_src, dst, force=True)
    assert read_manifest(dst).fingerprint == before
    assert leftovers(dst) == []
    sm = load_streaming_model(dst, cache_bytes=read_manifest(dst).total_expert_bytes)
    sm.close()


def test_failed_swap_into_place_keeps_the_old_pack(models, tmp_path, monkeypatch):
    """--force moves the old pack aside, then the new one in: if the second rename fails, the old comes back."""
    dst = tmp_path / "packed"
    pack(models.src("qwen3_moe", True, seed=1), dst)
    before = read_manifest(dst).fingerprint
    real = os.rename

    def failing(a, b, *args, **kwargs):
        if ".partial-" in os.fspath(a):
            raise OSError(28, "No space left on device (simulated)")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="simulated"):
        pack(models.src("qwen3_moe", True), dst, force=True)
    monkeypatch.undo()
    assert read_manifest(dst).fingerprint == before
    assert leftovers(dst) == []


KILLED_PACK = """
import os, sys
from pathlib import Path
import edgemoe.coordinator.pack as p
real, n = p._fill_record, [0]
def dying(*a, **k):
    n[0] += 1
    if n[0] == int(sys.argv[3]):
        os._exit(9)  # no cleanup runs: like a kill -9 or a power cut
    return real(*a, **k)
p._fill_record = dying
p.pack(Path(sys.argv[1]), Path(sys.argv[2]), force=True)
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_killed_pack_never_looks_complete(models, tmp_path, existing):
    src = models.src("qwen3_moe", True)
    dst = tmp_path / "packed"
    if existing:
        pack(models.src("qwen3_moe", True, seed=1), dst)
        before = read_manifest(dst).fingerprint
    for n in (1, 40):  # during the first layer, later
        out = subprocess.run([sys.executable, "-c", KILLED_PACK, str(src), str(dst), str(n)],
                             capture_output=True, text=True, env=cli_env(), cwd=REPO)
        assert out.returncode == 9, out.stderr
        if existing:
            assert read_manifest(dst).fingerprint == before
        else:
            assert not dst.exists()
            with pytest.raises(ManifestError):
                load_streaming_model(dst)
        assert leftovers(dst), "the kill left no partial directory: the test did not interrupt the pack"
        assert_no_usable_partial(dst)
    # The next pack succeeds and clears what the killed ones left.
    pack(src, dst, force=True)
    assert leftovers(dst) == []
    assert read_manifest(dst).fingerprint == read_manifest(models.packed("qwen3_moe", True)).fingerprint


# --------------------------------------------------------------------------- --force


def test_existing_dst_needs_force_and_force_replaces(models, tmp_path):
    dst = tmp_path / "packed"
    out = run_cli("pack", models.src("qwen3_moe", True), dst)
    assert out.returncode == 0, out.stderr
    first = read_manifest(dst).fingerprint

    out = run_cli("pack", models.src("qwen3_moe", True, seed=1), dst)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(dst) in lines[0] and "--force" in lines[0]
    assert read_manifest(dst).fingerprint == first

    (dst / "stray-file").write_text("from the old directory")
    out = run_cli("pack", models.src("qwen3_moe", True, seed=1), dst, "--force")
    assert out.returncode == 0, out.stderr
    assert read_manifest(dst).fingerprint == read_manifest(models.packed("qwen3_moe", True, seed=1)).fingerprint
    assert not (dst / "stray-file").exists()
    assert leftovers(dst) == []


def test_dst_equal_to_src_is_refused(models, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(models.src("mixtral", True), src)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(SourceModelError):
        pack(src, src, force=True)
    assert sorted(p.name for p in src.iterdir()) == before


# --------------------------------------------------------------------------- bounded memory

PACK_RSS = """
import json, sys
import edgemoe.coordinator.cli, edgemoe.coordinator.pack, mlx.core, mlx_lm.utils  # imports are the baseline

def peak_rss():
    # VmHWM, not ru_maxrss: on Linux ru_maxrss starts at the parent's peak after fork+exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

base = peak_rss()
rc = edgemoe.coordinator.cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "base": base, "growth": peak_rss() - base}))
"""


@pytest.fixture(scope="module")
def large_sources(tmp_path_factory):
    """8 layers x 32 experts x 1.5 MiB float32 = 384 MiB of experts, in two layouts."""
    root = tmp_path_factory.mktemp("large")
    return {
        # mlx-lm's stacked layout: pack copies expert bytes straight from the file
        "mlx": write_large_moe_source(root / "mlx"),
        # Hugging Face's per-expert layout: mlx-lm stacks on load, pack must evaluate
        "hf": write_large_moe_source(root / "hf", stacked=False),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, in_place, limit",
    [
        pytest.param("mlx", False, 64 * MiB, id="mlx-full"),
        pytest.param("mlx", True, 64 * MiB, id="mlx-in-place"),
        # one layer's stacked experts (48 MiB) may be in RAM at once, never all 8
        pytest.param("hf", False, 96 * MiB, id="hf-full"),
    ],
)
def test_pack_memory_is_bounded_by_far_less_than_the_experts(large_sources, tmp_path, layout, in_place, limit):
    src = large_sources[layout]
    dst = tmp_path / "packed"
    args = ["pack", str(src), str(dst)] + (["--in-place"] if in_place else [])
    out = subprocess.run([sys.executable, "-c", PACK_RSS, *args], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, out.stderr
    m = read_manifest(dst)
    assert m.total_expert_bytes >= 4 * limit
    assert result["growth"] < limit, (
        f"packing {m.total_expert_bytes / MiB:.0f} MiB of experts grew RSS by {result['growth'] / MiB:.0f} MiB"
    )
    # And what it wrote is the source's bytes: spot-check experts against the source file.
    from edgemoe.coordinator.safetensors_io import read_header

    header = read_header(src / "model.safetensors")
    with ExpertStore(dst, m) as store:
        for spec in (m.layers[0], m.layers[-1]):
            for e in (0, spec.num_experts - 1):
                got = record_to_arrays(spec, store.read(spec.layer, e))
                for t in spec.tensors:
                    if layout == "mlx":
                        stored = header[f"{spec.module_path}.{t.name}"]
                        offset = stored.offset + e * t.nbytes
                    else:
                        stored = header[f"{spec.module_path}.{t.name}".replace(".switch_mlp.", f".experts.{e}.")]
                        offset = stored.offset
                    expected = np.fromfile(stored.path, dtype=np.float32, count=t.nbytes // 4, offset=offset)
                    assert np.array_equal(np.array(got[t.name]), expected.reshape(t.shape))
