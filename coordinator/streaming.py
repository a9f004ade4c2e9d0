"""The streaming model: mlx-lm's architecture with every routed-expert module swapped for
one that hands its work to the layer's dispatcher (`dispatch.LayerDispatch`). Built by
`loader.load_streaming_model`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import Manifest

from .dispatch import LayerDispatch, LayerTimes

if TYPE_CHECKING:
    from .cluster import Cluster
    from .hotset import HotSet

def router_logits(router: nn.Module | None) -> Callable[[mx.array], mx.array] | None:
    """Router logits of a MoE block's gate: a (quantized) Linear, or a gate module
    holding an `[experts, hidden]` weight (DeepSeek's MoEGate). None if neither."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router
    if not isinstance(router, nn.Module):
        return None
    weight = router.get("weight")
    if isinstance(weight, mx.array) and weight.ndim == 2:
        # Looked up at each call: the weights are loaded after the dispatchers are built.
        return lambda x: x @ router["weight"].T
    return None


class StreamingExperts(nn.Module):
    """Stands in for mlx-lm's SwitchGLU/SwitchMLP: same call, its work done by the layer's dispatcher."""

    def __init__(self, dispatch: LayerDispatch):
        super().__init__()
        self.dispatch = dispatch

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.dispatch(x, indices)


@dataclass
class StreamingModel:
    model: nn.Module
    tokenizer: object
    config: dict
    manifest: Manifest
    local: LocalExperts
    dense_bytes: int
    cluster: Cluster | None = None
    hot_set: HotSet | None = None

    def __post_init__(self) -> None:
        # Found once (the dispatchers are built with the model): walking the module tree
        # costs ~0.3 ms, and the counters are read at every token.
        self.dispatchers = dispatchers(self.model)

    def guesses(self) -> tuple[int, int]:
        """Prefetch guesses made so far, and how many of them the next layer did ask for."""
        return sum(d.guessed for d in self.dispatchers), sum(d.guessed_right for d in self.dispatchers)

    def layer_times(self) -> LayerTimes:
        """Every MoE layer's `LayerTimes`, summed."""
        total = LayerTimes()
        for d in self.dispatchers:
            total.calls += d.times.calls
            total.routing_wait_s += d.times.routing_wait_s
            total.dispatch_s += d.times.dispatch_s
        return total

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        self.local.close()
        if self.hot_set is not None:  # after the experts' close, which counts the last routing
            self.hot_set.close()


def dispatchers(model: nn.Module) -> list[LayerDispatch]:
    return [m.dispatch for _, m in model.named_modules() if isinstance(m, StreamingExperts)]
