"""edgemoe: Mixture-of-Experts LLMs larger than RAM, experts streamed from SSD and LAN peers.

The Python API is shaped like mlx-lm's, and its model works with mlx-lm's own
`generate`/`stream_generate`:

    import edgemoe
    from mlx_lm import generate

    model, tokenizer = edgemoe.load("packed-model", cache_mb=2048)
    print(generate(model, tokenizer, "Hello", max_tokens=32))
    print(edgemoe.stats(model))

mlx and mlx-lm are imported on first use, so that `edgemoe --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemoe.node.version import EDGEMOE_VERSION as __version__

if TYPE_CHECKING:
    from pathlib import Path

    import mlx.nn as nn

__all__ = ["__version__", "close", "load", "stats"]


def load(
    path: str | Path,
    cache_mb: float | None = None,
    peers: list[str] | str | None = None,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """Loads a packed model (`edgemoe pack`) as `(model, tokenizer)`, like `mlx_lm.load`.

    `cache_mb` is the RAM cache for routed experts (default: a quarter of RAM, at
    most the model's experts); `peers` is "auto" (browse for edge nodes), a list of
    "HOST:PORT" or None (this machine only). Other options are those of
    `edgemoe generate` (`experts_per_token`, `io_mode`, `prefetch`, `cluster_dir`, ...).
    """
    from edgemoe.coordinator.api import load as _load

    return _load(path, cache_mb=cache_mb, peers=peers, **options)


def stats(model: nn.Module) -> dict[str, Any]:
    """Counters of a model from `load` since it was loaded: cache hits, SSD bytes, peers."""
    from edgemoe.coordinator.api import stats as _stats

    return _stats(model)


def close(model: nn.Module) -> None:
    """Stops a loaded model's reader threads and peer connections."""
    from edgemoe.coordinator.api import close as _close

    _close(model)
