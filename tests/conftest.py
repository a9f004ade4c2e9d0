"""Shared fixtures: tiny mlx-lm MoE models built once per session, their packs, mlx-lm's own answers."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from edgemoe.coordinator.hotset import HOT_SET_DIR
from edgemoe.coordinator.pack import pack
from edgemoe.coordinator.tiny_models import SUPPORTED_ARCHS, write_tiny_model, write_tokenizer

REPO = Path(__file__).resolve().parent.parent

# Long enough for gpt_oss's 16-token sliding window to wrap during a generation.
MAX_TOKENS = 24
PROMPT = "Once upon a time there was a small model"
# Prefill of this prompt routes > 64 token-expert pairs even at K=1, which is
# when mlx-lm's SwitchGLU/SwitchMLP sort tokens by expert (`_gather_sort`).
LONG_PROMPT = (
    "The coordinator schedules layers, the nodes hold weights, and tokens flow. "
    "Each expert lived in its own file, and the router chose which ones to read. "
    "When a token arrived, the router looked at it and picked the best experts. "
    "Memory is precious on small devices, so only the hot experts stay resident."
)


def in_ci() -> bool:
    """CI sets CI=true (`.ci/run` does too): there every test must run, none may skip."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(reason: str | None) -> None:
    """Skips the calling test where it cannot run, with `reason`; under CI fails with it instead."""
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"this test must run in CI but cannot: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    unavailable(None if os.geteuid() == 0 else "needs root (run the tests as root)")


def require(tool: str) -> None:
    unavailable(None if shutil.which(tool) else f"`{tool}` is not installed")


def require_namespaces() -> None:
    import netns

    unavailable(netns.unavailable_reason())


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Marking a test `netns` is enough: it runs only where namespaces work (or fails in CI).
    if item.get_closest_marker("netns"):
        require_namespaces()
    for marker in item.iter_markers("requires_tool"):
        require(*marker.args)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # An empty TMPDIR breaks mlx's compiled sampler (docs/DESIGN.md).
    if not env.get("TMPDIR"):
        env.pop("TMPDIR", None)
    return env


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`edgemoe ARGS` as a user runs it: a separate process through the CLI's entry point."""
    return subprocess.run(
        [sys.executable, "-m", "edgemoe.coordinator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=REPO,
    )


class Models:
    """Builds each tiny model (and each pack of it) once per session."""

    def __init__(self, root: Path):
        self.root = root
        self._srcs: dict[tuple, Path] = {}
        self._packs: dict[tuple, Path] = {}
        self._mlx: dict[Path, tuple] = {}

    def src(self, arch: str = "qwen3_moe", quantized: bool = True, seed: int = 0, dtype: str = "float32") -> Path:
        key = (arch, quantized, seed, dtype)
        if key not in self._srcs:
            path = self.root / f"src-{arch}-{'q' if quantized else 'f'}-{seed}-{dtype}"
            self._srcs[key] = write_tiny_model(path, arch=arch, quantized=quantized, seed=seed, dtype=dtype)
        return self._srcs[key]

    def packed(self, arch: str = "qwen3_moe", quantized: bool = True, in_place: bool = False, seed: int = 0,
               dtype: str = "float32") -> Path:
        key = (arch, quantized, in_place, seed, dtype)
        if key not in self._packs:
            src = self.src(arch, quantized, seed, dtype)
            name = f"packed-{arch}-{'q' if quantized else 'f'}-{seed}-{dtype}{'-inplace' if in_place else ''}"
            dst = self.root / name
            pack(src, dst, in_place=in_place)
            self._packs[key] = dst
        return self._packs[key]

    def mlx_lm_model(self, src: Path):
        """mlx-lm's own (model, tokenizer) for a source dir, loaded once."""
        if src not in self._mlx:
            import mlx_lm

            self._mlx[src] = mlx_lm.load(str(src))
        return self._mlx[src]

    def copy_packed(self, dst: Path, **kwargs) -> Path:
        """A private copy of a full pack, for tests that damage it."""
        shutil.copytree(self.packed(**kwargs), dst)
        return dst


@pytest.fixture(scope="session")
def large(tmp_path_factory) -> tuple[Path, Path]:
    """(source, packed) with float32 experts of 1.5 MiB: two misses are more than an inline
    read, so misses are read in the background (and, with direct I/O, computed as they land)."""
    root = tmp_path_factory.mktemp("large-experts")
    src = write_tiny_model(root / "src", quantized=False, num_experts=8, num_experts_per_tok=2,
                           hidden_size=256, moe_intermediate_size=512)
    pack(src, root / "packed")
    return src, root / "packed"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))


@contextmanager
def computing_on(device: mx.Device) -> Iterator[None]:
    """Runs a block, reference included, on another MLX device (the CPU on the GPU machine)."""
    before = mx.default_device()
    mx.set_default_device(device)
    try:
        yield
    finally:
        mx.set_default_device(before)


def mlx_lm_tokens(
    src: Path,
    prompt_ids: list[int],
    max_tokens: int = MAX_TOKENS,
    model_config: dict | None = None,
    temp: float = 0.0,
    seed: int | None = None,
    models: Models | None = None,
    top_p: float = 0.0,
) -> tuple[list[int], str]:
    """What plain mlx-lm generates from the source model: the reference every test compares with."""
    import mlx_lm
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if model_config is None and models is not None:
        model, tokenizer = models.mlx_lm_model(src)
    else:
        model, tokenizer = mlx_lm.load(str(src), model_config=model_config)
    if seed is not None:
        mx.random.seed(seed)
    tokens, text = [], []
    for response in stream_generate(
        model, tokenizer, mx.array(prompt_ids), max_tokens=max_tokens, sampler=make_sampler(temp=temp, top_p=top_p)
    ):
        tokens.append(response.token)
        text.append(response.text)
    return tokens, "".join(text)


def mlx_lm_experts_per_token_config(src: Path, k: int) -> dict:
    """`model_config` that makes mlx_lm.load route to k experts (nested under text_config where the arch keeps it)."""
    config = json.loads((src / "config.json").read_text())
    if "num_experts_per_tok" in config:
        return {"num_experts_per_tok": k}
    text_config = dict(config["text_config"])
    text_config["num_experts_per_tok"] = k
    return {"text_config": text_config}


def encode(models: Models, src: Path, text: str) -> list[int]:
    """Prompt token ids from mlx-lm's tokenizer for the source model."""
    return list(models.mlx_lm_model(src)[1].encode(text))


# ---------------------------------------------------------------------------
# A large float32 MoE source written tensor by tensor, for bounded-memory tests.


def write_large_moe_source(
    dst: Path,
    num_layers: int = 8,
    num_experts: int = 32,
    hidden_size: int = 512,
    moe_intermediate_size: int = 256,
    stacked: bool = True,
) -> Path:
    """An unquantized qwen3_moe mlx-lm dir with `num_experts` per layer, never whole in RAM.

    The config and tokenizer come from a tiny model of the same arch and shape
    with only 2 experts per layer; the weights are written one expert slice at a
    time in mlx-lm's stacked layout (`...switch_mlp.gate_proj.weight` [E, I, H]),
    or with `stacked=False` in the Hugging Face layout mlx-lm's `sanitize` stacks
    on load (`...mlp.experts.{e}.gate_proj.weight` [I, H]).
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    shape_dir = dst.parent / f"{dst.name}-shape"
    write_tiny_model(
        shape_dir,
        arch="qwen3_moe",
        quantized=False,
        num_layers=num_layers,
        num_experts=2,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
    )
    dst.mkdir(parents=True)
    write_tokenizer(dst)
    config = json.loads((shape_dir / "config.json").read_text())
    config["num_experts"] = num_experts
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(shape_dir)

    # The architecture's parameter names and shapes; mlx arrays are lazy, so
    # nothing of the model's size is allocated here.
    model_class, args_class = _get_classes(config)
    params = tree_flatten(model_class(args_class.from_dict(config)).parameters())
    names_shapes = sorted((n, tuple(p.shape)) for n, p in params)
    if not stacked:
        names_shapes = sorted(
            (f"{n.replace('.switch_mlp.', '.experts.{}.')}".format(e), shape[1:])
            for n, shape in names_shapes
            if ".switch_mlp." in n
            for e in range(shape[0])
        ) + [(n, shape) for n, shape in names_shapes if ".switch_mlp." not in n]
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, shape in names_shapes:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in names_shapes:
            rows = shape[0] if len(shape) == 3 else 1
            per_row = math.prod(shape) // rows
            for _ in range(rows):
                if name.endswith("norm.weight"):
                    chunk = np.ones(per_row, np.float32)
                else:
                    chunk = rng.standard_normal(per_row, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))
                f.write(chunk.tobytes())
    return dst


__all__ = [
    "LONG_PROMPT",
    "MAX_TOKENS",
    "PROMPT",
    "SUPPORTED_ARCHS",
    "encode",
    "mlx_lm_experts_per_token_config",
    "mlx_lm_tokens",
    "require",
    "require_namespaces",
    "require_root",
    "run_cli",
    "unavailable",
    "write_large_moe_source",
]


@pytest.fixture(scope="session", autouse=True)
def edgemoe_home(tmp_path_factory):
    """Keeps the suite's runs (cluster token lookups, the last-run record) out of the user's home."""
    home = tmp_path_factory.mktemp("edgemoe-home")
    saved = os.environ.get("EDGEMOE_HOME")
    os.environ["EDGEMOE_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("EDGEMOE_HOME", None)
    else:
        os.environ["EDGEMOE_HOME"] = saved


@pytest.fixture(autouse=True)
def no_hot_sets_from_other_tests():
    """Each test starts with no learned hot set: a run's hot set (the CLI and `edgemoe.load`
    keep one) would otherwise warm a later test's cache, changing its reads and its output."""
    shutil.rmtree(Path(os.environ["EDGEMOE_HOME"]) / HOT_SET_DIR, ignore_errors=True)
