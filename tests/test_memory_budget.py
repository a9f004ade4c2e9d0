"""Budgets come from the memory MLX's arrays live in (GPU memory on CUDA, Metal's share of
unified memory, RAM on the CPU), and peak array memory is reported next to peak RSS.

The GPU cases fake MLX's device and device_info: CI has no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from conftest import cli_env, run_cli

from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import default_cache_bytes, load_streaming_model
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import write_tiny_model
from edgemoe.node import daemon, limits

GiB = 2**30
RAM = 64 * GiB
# What MLX 0.32's device_info reports on CUDA (NVML's figures) and on Metal.
CUDA_INFO = {"device_name": "NVIDIA H200", "architecture": "sm_90", "total_memory": 141 * GiB,
             "free_memory": 140 * GiB, "uuid": "GPU-0", "pci_bus_id": "0000:01:00.0"}
METAL_INFO = {"architecture": "applegpu_g15s", "memory_size": 48 * GiB,
              "max_recommended_working_set_size": 36 * GiB, "max_buffer_size": 24 * GiB, "resource_limit": 499000}


@pytest.fixture
def fake(monkeypatch):
    """fake(device_type, info): MLX's default device and its device_info, and RAM of RAM bytes."""
    monkeypatch.setattr(limits, "ram_bytes", lambda: RAM)

    def install(device_type, info: dict) -> None:
        monkeypatch.setattr(mx, "default_device", lambda: mx.Device(device_type))
        monkeypatch.setattr(mx, "device_info", lambda *a: dict(info))

    return install


def test_cuda_budgets_come_from_the_cards_memory(fake):
    fake(mx.gpu, CUDA_INFO)
    assert limits.array_memory_bytes() == 141 * GiB


def test_metal_budgets_come_from_the_recommended_working_set(fake):
    fake(mx.gpu, METAL_INFO)
    assert limits.array_memory_bytes() == 36 * GiB


def test_cpu_budgets_come_from_ram_whatever_the_device_says(fake):
    fake(mx.cpu, CUDA_INFO)
    assert limits.array_memory_bytes() == RAM
    assert limits.array_memory_kind() == "RAM"


def test_a_gpu_without_memory_figures_falls_back_to_ram(fake):
    fake(mx.gpu, {"device_name": "?", "architecture": "?"})
    assert limits.array_memory_bytes() == RAM


def test_where_arrays_live_on_a_gpu(fake, monkeypatch):
    fake(mx.gpu, CUDA_INFO)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert limits.array_memory_kind() == "GPU memory"
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert limits.array_memory_kind() == "unified memory"


def test_default_cache_is_a_quarter_of_array_memory(fake):
    fake(mx.gpu, {**CUDA_INFO, "total_memory": 10 * GiB})
    manifest = SimpleNamespace(expert_bytes=2**20, total_expert_bytes=100 * GiB)
    assert default_cache_bytes(manifest) == 10 * GiB // 4  # not RAM // 4
    # Never more than every expert, never less than one.
    assert default_cache_bytes(SimpleNamespace(expert_bytes=2**20, total_expert_bytes=GiB)) == GiB
    assert default_cache_bytes(SimpleNamespace(expert_bytes=3 * GiB, total_expert_bytes=100 * GiB)) == 3 * GiB


def test_edge_node_cache_default_is_a_quarter_of_array_memory(fake):
    fake(mx.gpu, CUDA_INFO)
    assert daemon.parse_args([]).cache_mb == 141 * 1024 / 4
    fake(mx.cpu, CUDA_INFO)
    assert daemon.parse_args([]).cache_mb == RAM / 2**20 / 4


def test_backend_missing_names_the_extra():
    message = limits.mlx_backend_missing(ImportError("libmlx.so: cannot open shared object file: No such file"))
    assert message is not None and "edgemoe[cpu]" in message and "edgemoe[cuda]" in message
    assert limits.mlx_backend_missing(ImportError("No module named 'numpy'")) is None


# MLX's front end without a backend (`pip install edgemoe` on Linux) fails to load libmlx.so.
NO_BACKEND = """
import sys
class NoBackend:
    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")
sys.meta_path.insert(0, NoBackend())
if sys.argv[1] == "edge-node":
    from edgemoe.node.daemon import main
else:
    from edgemoe.coordinator.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", ["edgemoe", "edge-node"])
def test_without_an_mlx_backend_each_command_says_which_extra_in_one_line(tmp_path, command):
    args = (["demo-model", str(tmp_path / "m")] if command == "edgemoe" else
            ["--join", "x" * 8, "--data-dir", str(tmp_path / "node"), "--listen", "127.0.0.1:0", "--no-advertise"])
    out = subprocess.run([sys.executable, "-c", NO_BACKEND, command, *args],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"{command}: error:") and "pip install 'edgemoe[cpu]'" in out.stderr


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("budget")
    write_tiny_model(root / "src", num_layers=2)
    pack(root / "src", root / "packed")
    return root / "packed"


def test_peak_array_memory_after_a_generation(packed):
    sm = load_streaming_model(packed, cache_bytes=2**20)
    try:
        result = generate(sm, build_prompt(sm.tokenizer, "hello", chat_template=False), max_tokens=4)
    finally:
        sm.close()
    stats = result.stats
    assert stats.peak_array_bytes >= sm.dense_bytes > 0
    # On the CPU backend MLX's allocations are in RAM: a part of peak RSS.
    assert stats.array_memory == "RAM"
    assert stats.peak_array_bytes <= stats.peak_rss_bytes
    assert f"MLX peak {stats.peak_array_bytes / 2**20:.0f} MiB (RAM)" in stats.summary()


def test_generate_json_reports_peak_array_memory(packed):
    out = run_cli("generate", "--model", str(packed), "--prompt", "hello", "--max-tokens", "3", "--json",
                  "--no-chat-template", "--peers", "none")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])["stats"]
    assert 0 < stats["peak_array_bytes"] <= stats["peak_rss_bytes"]
    assert stats["array_memory"] == "RAM"
