"""What a user can get wrong, through the real CLI: a non-zero exit and one line saying what and what to do."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PROMPT, encode, run_cli, unavailable

from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.coordinator.pack import pack
from edgemoe.node.errors import ChecksumError
from edgemoe.node.manifest import DENSE_NAME, MANIFEST_NAME, read_manifest


def assert_fails_cleanly(out, *needles: str) -> str:
    """Non-zero exit, no traceback, one stderr line naming the problem (every needle) and what to do."""
    assert out.returncode != 0, f"expected a failure, got exit 0: {out.stdout!r}"
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("edgemoe: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def generate_args(model, *extra) -> list:
    return ["generate", "--model", model, "--prompt", PROMPT, "--no-chat-template", "--max-tokens", 8, *extra]


@pytest.fixture
def packed_copy(models, tmp_path) -> Path:
    return models.copy_packed(tmp_path / "packed", arch="qwen3_moe", quantized=True)


# --------------------------------------------------------------------------- damaged packed models


def test_missing_expert_file(packed_copy):
    victim = packed_copy / "experts" / "layer-0001.bin"
    victim.unlink()
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(victim), "missing", "edgemoe pack")
    assert out.stdout == ""


def test_truncated_expert_file(packed_copy):
    victim = packed_copy / "experts" / "layer-0002.bin"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size - 100)
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(victim), "truncated", "edgemoe pack")
    assert out.stdout == ""


def first_expert_used(packed: Path, prompt_ids: list[int]) -> tuple[int, int]:
    """The first (layer, expert) the prompt's prefill fetches."""
    from edgemoe.node.local import LocalExperts

    sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
    seen = []
    original = LocalExperts.start_slots

    def recording(self, layer, experts):
        seen.extend((layer, e) for e in experts)
        return original(self, layer, experts)

    try:
        LocalExperts.start_slots = recording
        generate(sm, prompt_ids, max_tokens=1)
    finally:
        LocalExperts.start_slots = original
        sm.close()
    return seen[0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def expert_file(packed: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else packed / name


def corrupt_expert(packed: Path, layer: int, expert: int) -> tuple[Path, str]:
    """Flips one byte inside the expert's first tensor; returns the file and the corrupted record's sha256."""
    m = read_manifest(packed)
    spec = m.layer(layer)
    entry = spec.experts[expert]
    first = spec.tensors[0].offset
    seg = next(s for s in entry.segments if s.record_offset <= first < s.record_offset + s.length)
    path = expert_file(packed, m.files[seg.file])
    flip_byte(path, seg.offset + first - seg.record_offset + 7)
    # The corrupted record as a reader would assemble it.
    record = bytearray(spec.record_bytes)
    for s in entry.segments:
        with open(expert_file(packed, m.files[s.file]), "rb") as f:
            f.seek(s.offset)
            record[s.record_offset : s.record_offset + s.length] = f.read(s.length)
    sha = hashlib.sha256(record).hexdigest()
    assert sha != entry.checksum
    return path, sha


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_flipped_byte_in_an_expert_fails_the_run(models, packed_copy, json_output):
    src = models.src("qwen3_moe", True)
    layer, expert = first_expert_used(packed_copy, encode(models, src, PROMPT))
    path, _ = corrupt_expert(packed_copy, layer, expert)
    out = run_cli(*generate_args(packed_copy, *(["--json"] if json_output else [])))
    assert_fails_cleanly(out, "checksum", f"layer {layer} expert {expert}", str(path), "edgemoe pack")
    # The corrupted expert never reached compute: not one token came out.
    assert out.stdout == ""


def assert_corrupted_expert_never_computed(packed: Path, prompt: list[int], monkeypatch, **load_kwargs) -> None:
    """Corrupts the first expert the prompt reads; the run must fail before computing anything of its layer."""
    from edgemoe.node.compute import ExpertKernel

    layer, expert = first_expert_used(packed, prompt)
    corrupt_expert(packed, layer, expert)
    computed_layers = []
    real = ExpertKernel.__call__

    def spying(self, x, slots, *args):
        computed_layers.append(self.spec.layer)
        return real(self, x, slots, *args)

    monkeypatch.setattr(ExpertKernel, "__call__", spying)
    tokens = []
    sm = load_streaming_model(packed, **load_kwargs)
    try:
        with pytest.raises(ChecksumError):
            generate(sm, prompt, max_tokens=8, on_token=tokens.append)
        assert (layer, expert) not in sm.local
    finally:
        sm.close()
    assert tokens == []
    # The layer whose expert failed its checksum computed nothing.
    assert layer not in computed_layers


def test_corrupted_expert_is_never_computed_with(models, packed_copy, monkeypatch):
    prompt = encode(models, models.src("qwen3_moe", True), PROMPT)
    assert_corrupted_expert_never_computed(packed_copy, prompt, monkeypatch,
                                           cache_bytes=read_manifest(packed_copy).total_expert_bytes)


@pytest.mark.parametrize("way", ["read-inline", "on-io-threads", "readahead"])
def test_a_corrupted_prefetched_expert_costs_only_time(packed_copy, monkeypatch, way):
    """A guessed expert whose record fails its checksum never reaches a slot, and the
    prefetch raises nothing: its real read reports the error. On the I/O threads each
    record is checked alone, so the others guessed with it are used; a small batch read
    inline is checked as a batch, and is dropped whole. Read ahead by the kernel, nothing
    is checked until the misses are read, each on its own."""
    from edgemoe.node import store as store_module
    from edgemoe.node.local import LocalExperts
    from edgemoe.node.store import ExpertStore

    if way == "readahead" and not hasattr(os, "posix_fadvise"):
        unavailable("this OS has no posix_fadvise: --prefetch reads into slots there")
    if way != "readahead":  # the prefetch into slots, as where there is no posix_fadvise or with direct I/O
        monkeypatch.setattr(ExpertStore, "can_advise", property(lambda self: False))
    if way == "on-io-threads":
        monkeypatch.setattr(store_module, "INLINE_READ_BYTES", 0)
    manifest = read_manifest(packed_copy)
    spec = manifest.layers[1]
    path, _ = corrupt_expert(packed_copy, spec.layer, 3)
    path.read_bytes()  # in the page cache: a small batch is read inline only from there
    local = LocalExperts(ExpertStore(packed_copy, manifest, io_mode="buffered"), 4 * spec.record_bytes,
                         prefetch_experts=4)
    try:
        assert local.prefetch_width == (8 if way == "readahead" else 4)
        local.prefetch(spec.layer, [3, 5])
        slot = int(local.slots(spec.layer, [5])[0])
        expected = {"read-inline": (0, 0, 1), "on-io-threads": (2, 1, 0), "readahead": (2, 1, 0)}[way]
        assert (local.stats.prefetched, local.stats.prefetch_used, local.stats.experts_from_ssd) == expected
        reference = ExpertStore(packed_copy, manifest, io_mode="buffered")
        record = reference.read(spec.layer, 5)
        reference.close()
        in_slot = [bytes(v) for v in local._group_of[spec.layer].pool.views(slot)]
        assert in_slot == [record[t.offset : t.offset + t.nbytes].tobytes() for t in spec.tensors]
        with pytest.raises(ChecksumError, match=f"layer {spec.layer} expert 3"):
            local.slots(spec.layer, [3])
        assert (spec.layer, 3) not in local
    finally:
        local.close()


def test_flipped_byte_in_an_in_place_source(models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(models.src("qwen3_moe", True), src)
    pack(src, tmp_path / "packed", in_place=True)
    layer, expert = first_expert_used(tmp_path / "packed", encode(models, src, PROMPT))
    path, _ = corrupt_expert(tmp_path / "packed", layer, expert)
    assert path.parent == src.resolve()
    out = run_cli(*generate_args(tmp_path / "packed"))
    assert_fails_cleanly(out, "checksum", str(path))
    assert out.stdout == ""


def test_in_place_source_gone(models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(models.src("qwen3_moe", True), src)
    pack(src, tmp_path / "packed", in_place=True)
    (src / "model.safetensors").rename(src / "moved.safetensors")
    out = run_cli(*generate_args(tmp_path / "packed"))
    assert_fails_cleanly(out, str(src.resolve() / "model.safetensors"), "missing")


def test_manifest_of_another_format_version(packed_copy):
    path = packed_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = data["format_version"] + 1
    path.write_text(json.dumps(data))
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(path), f"version {data['format_version']}", "--force")


def test_manifest_not_json(packed_copy):
    path = packed_copy / MANIFEST_NAME
    path.write_text(path.read_text()[:100])
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(path), "unreadable", "pack")


def test_manifest_missing_expert_entries(packed_copy):
    path = packed_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    for layer in data["layers"]:
        layer["experts"] = layer["experts"][:-1]
    path.write_text(json.dumps(data))
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(path), "pack")


def test_missing_dense_file(packed_copy):
    (packed_copy / DENSE_NAME).unlink()
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(packed_copy / DENSE_NAME), "missing", "edgemoe pack")


def test_truncated_dense_file(packed_copy):
    path = packed_copy / DENSE_NAME
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, str(path), "repack")


def test_model_dir_is_not_a_packed_model(models):
    src = models.src("qwen3_moe", True)
    out = run_cli(*generate_args(src))
    assert_fails_cleanly(out, str(src / MANIFEST_NAME), "edgemoe pack")


def test_nonexistent_model_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    out = run_cli(*generate_args(missing))
    assert_fails_cleanly(out, str(missing), "no such directory", "edgemoe pack")


def test_unknown_architecture_in_packed_model(packed_copy):
    path = packed_copy / "config.json"
    path.write_text(path.read_text().replace('"model_type": "qwen3_moe"', '"model_type": "nosuch"'))
    assert '"nosuch"' in path.read_text()
    out = run_cli(*generate_args(packed_copy))
    assert_fails_cleanly(out, "'nosuch'", "mlx-lm")


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("k", [0, -1, 5])
def test_experts_per_token_out_of_range(models, k):
    packed = models.packed("qwen3_moe", True)
    routed = json.loads((packed / "config.json").read_text())["num_experts_per_tok"]
    out = run_cli(*generate_args(packed, "--experts-per-token", k))
    assert_fails_cleanly(out, f"--experts-per-token {k}", f"1 to {routed}")
    assert out.stdout == ""


def test_cache_smaller_than_one_expert(models):
    packed = models.packed("qwen3_moe", False)
    expert_mb = read_manifest(packed).expert_bytes / 2**20
    out = run_cli(*generate_args(packed, "--cache-mb", f"{expert_mb / 2:.4f}"))
    line = assert_fails_cleanly(out, "--cache-mb", "at least")
    assert f"{expert_mb:.3f} MB" in line


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cache_mb_not_positive(models, value):
    out = run_cli(*generate_args(models.packed("qwen3_moe", True), "--cache-mb", value))
    assert_fails_cleanly(out, "--cache-mb", "positive")


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_node_timeout_not_positive(models, command, value):
    extra = ["--prompt", PROMPT] if command == "generate" else []
    out = run_cli(command, "--model", models.packed("qwen3_moe", True), *extra, "--node-timeout", value)
    assert_fails_cleanly(out, "--node-timeout", "positive number of seconds")


def test_max_tokens_zero(models):
    out = run_cli("generate", "--model", models.packed("qwen3_moe", True), "--prompt", PROMPT, "--max-tokens", 0)
    assert_fails_cleanly(out, "--max-tokens 0", "at least 1")


def test_empty_prompt(models):
    out = run_cli("generate", "--model", models.packed("qwen3_moe", True), "--prompt", "", "--no-chat-template")
    assert_fails_cleanly(out, "--prompt")


# --------------------------------------------------------------------------- bad pack sources


def test_pack_source_without_config(tmp_path):
    src = tmp_path / "not-a-model"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    out = run_cli("pack", src, tmp_path / "dst")
    assert_fails_cleanly(out, str(src), "config.json")
    assert not (tmp_path / "dst").exists()


def test_pack_source_missing(tmp_path):
    out = run_cli("pack", tmp_path / "nowhere", tmp_path / "dst")
    assert_fails_cleanly(out, str(tmp_path / "nowhere"), "no such directory")


def test_pack_source_without_weights(models, tmp_path):
    src = tmp_path / "config-only"
    src.mkdir()
    shutil.copy(models.src("qwen3_moe", True) / "config.json", src)
    out = run_cli("pack", src, tmp_path / "dst")
    assert_fails_cleanly(out, str(src), "safetensors")


def test_pack_source_weights_do_not_fit_config(models, tmp_path):
    src = tmp_path / "mismatched"
    shutil.copytree(models.src("qwen3_moe", True), src)
    shutil.copy(models.src("mixtral", False) / "model.safetensors", src / "model.safetensors")
    out = run_cli("pack", src, tmp_path / "dst")
    assert_fails_cleanly(out, str(src), "mlx_lm")
    assert not (tmp_path / "dst").exists()


def write_dense_model(dst: Path, model_type: str) -> Path:
    """A tiny non-MoE mlx-lm model, made with mlx-lm's own classes."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_config, save_model

    from edgemoe.coordinator.tiny_models import write_tokenizer

    dst.mkdir(parents=True)
    write_tokenizer(dst)
    config = {
        "model_type": model_type, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_model(dst, model)
    save_config(config, config_path=dst / "config.json")
    return dst


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_pack_dense_model(tmp_path, model_type):
    src = write_dense_model(tmp_path / model_type, model_type)
    out = run_cli("pack", src, tmp_path / "dst")
    assert_fails_cleanly(out, str(src), model_type, "not an MoE model")
    assert not (tmp_path / "dst").exists()


def test_pack_unknown_architecture(models, tmp_path):
    src = tmp_path / "nosuch"
    shutil.copytree(models.src("qwen3_moe", True), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "nosuch"
    (src / "config.json").write_text(json.dumps(config))
    out = run_cli("pack", src, tmp_path / "dst")
    assert_fails_cleanly(out, "'nosuch'", "mlx-lm")
    assert not (tmp_path / "dst").exists()


def test_pack_in_place_of_unstacked_experts(tmp_path):
    from conftest import write_large_moe_source

    src = write_large_moe_source(tmp_path / "hf", num_layers=2, num_experts=4, hidden_size=64,
                                 moe_intermediate_size=32, stacked=False)
    out = run_cli("pack", src, tmp_path / "dst", "--in-place")
    assert_fails_cleanly(out, "--in-place", "without --in-place")
    assert not (tmp_path / "dst").exists()
