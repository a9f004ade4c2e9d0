"""Progress bars for long work: on stderr, and only when stderr is a terminal (unless forced)."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

POLL_S = 0.2


def progress_bar(total: int, desc: str, always: bool = False, position: int | None = None,
                 leave: bool = True) -> tqdm:
    """A byte-counting bar; `always` shows it off a terminal too (tqdm's disable=None hides it there)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                disable=False if always else None, position=position, leave=leave)


def show_push_progress(cluster: Any, timeout_s: float, always: bool = False) -> bool:
    """One bar per node while the cluster pushes its placement; True once every healthy
    node holds what it was given, False on timeout."""
    deadline = time.monotonic() + timeout_s
    bars: dict[str, tqdm] = {}
    try:
        while True:
            shares = cluster.push_progress()
            for index, share in enumerate(shares):
                bar = bars.get(share.name)
                if bar is None:
                    bar = bars[share.name] = progress_bar(share.planned_bytes, f"pushing experts to {share.name}",
                                                          always, position=index)
                bar.total = share.planned_bytes
                bar.n = share.held_bytes
                bar.refresh()
            # Complete by the snapshot the bars show too, so none stops short of 100%.
            if cluster.placement_complete() and all(s.held_experts == s.planned_experts for s in shares):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
    finally:
        for bar in bars.values():
            bar.close()
