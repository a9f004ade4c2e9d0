"""The learned hot set: routing counts kept across runs, per model, in EDGEMOE_HOME.

At load they seed the expert cache's counts and the hottest experts that fit are read
into the cache before the first token, so a second run on the same kind of prompt
starts with hits; cluster placement reads the same counts (`LocalExperts.routing_counts`),
so it starts from the history too. They are saved while the model runs (every
SAVE_INTERVAL_S) and when it is closed.

One file per model fingerprint, `$EDGEMOE_HOME/hot-sets/FINGERPRINT.json`, replaced
atomically (node/holdings.py's `write_durably`). Bounded: at most MAX_MODELS files
(the least recently written go), none read over MAX_FILE_BYTES, every count capped.
A file that is damaged, too big or of another model is ignored with one warning and
replaced at the end of the run.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from pathlib import Path

from edgemoe.node.errors import EdgemoeError, ManifestError
from edgemoe.node.holdings import write_durably
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import Manifest, read_manifest

from .status import edgemoe_home

log = logging.getLogger(__name__)

HOT_SET_DIR = "hot-sets"
FORMAT = 1
MAX_MODELS = 32
# Layers x experts counts: Kimi K2's 61 x 384 is about 150 KB of JSON.
MAX_FILE_BYTES = 8 * 2**20
MAX_COUNT = 2**31 - 1
# A run's history counts half in the next run, and the hottest expert starts at most at
# SEED_MAX: the LFU cache still admits a newly hot expert after that many routings.
DECAY = 0.5
SEED_MAX = 64
SAVE_INTERVAL_S = 60.0
_FINGERPRINT = re.compile(r"[0-9a-f]{16,128}")


def hot_set_dir() -> Path:
    return edgemoe_home() / HOT_SET_DIR


def hot_set_path(fingerprint: str) -> Path:
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ManifestError(f"model fingerprint {fingerprint!r} is not hex; repack the model")
    return hot_set_dir() / f"{fingerprint}.json"


def load_counts(manifest: Manifest) -> dict[tuple[int, int], int]:
    """The saved counts of this model, or {} (none, or one warning for a file not used)."""
    try:
        path = hot_set_path(manifest.fingerprint)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{size} bytes, over the {MAX_FILE_BYTES} a hot set may have")
        data = json.loads(path.read_bytes())
        return _parse(data, manifest)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, ManifestError) as exc:
        log.warning("ignoring this model's learned hot set in %s (%s): it is rewritten at the end of this run",
                    hot_set_dir(), exc)
        return {}


def _parse(data: dict, manifest: Manifest) -> dict[tuple[int, int], int]:
    if data.get("format") != FORMAT or data.get("fingerprint") != manifest.fingerprint:
        raise ValueError("another format or model")
    num_experts = {spec.layer: spec.num_experts for spec in manifest.layers}
    counts: dict[tuple[int, int], int] = {}
    for layer_name, row in data["layers"].items():
        layer = int(layer_name)
        if layer not in num_experts or not isinstance(row, list) or len(row) != num_experts[layer]:
            raise ValueError(f"layer {layer_name} does not fit the model")
        for expert, count in enumerate(row):
            if type(count) is not int or not 0 <= count <= MAX_COUNT:
                raise ValueError(f"count {count!r} of layer {layer} is not a count")
            if count:
                counts[(layer, expert)] = count
    return counts


def save_counts(manifest: Manifest, counts: dict[tuple[int, int], int]) -> Path:
    """Writes the counts atomically, then prunes the directory to MAX_MODELS files."""
    rows = {spec.layer: [0] * spec.num_experts for spec in manifest.layers}
    for (layer, expert), count in counts.items():
        if layer in rows and 0 <= expert < len(rows[layer]):
            rows[layer][expert] = min(MAX_COUNT, count)
    data = {"format": FORMAT, "fingerprint": manifest.fingerprint,
            "layers": {str(layer): row for layer, row in sorted(rows.items())}}
    path = hot_set_path(manifest.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(data, separators=(",", ":")).encode())
    prune()
    return path


def prune(keep: int = MAX_MODELS) -> list[Path]:
    """Removes all but the `keep` most recently written hot sets; returns those removed."""
    files = []
    for path in hot_set_dir().glob("*.json"):
        try:
            files.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # removed meanwhile by another run
            continue
    files.sort(reverse=True)
    removed = []
    for _, path in files[keep:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def forget(model_dir: Path) -> Path | None:
    """Removes the model's learned hot set; returns its path, or None if none was kept."""
    path = hot_set_path(read_manifest(model_dir).fingerprint)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def seed(counts: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """Saved counts as this run starts them: decayed, the hottest at most SEED_MAX."""
    if not counts:
        return {}
    scale = min(DECAY, SEED_MAX / max(counts.values()))
    return {key: n for key, c in counts.items() if (n := int(c * scale)) > 0}


class HotSet:
    """One loaded model's hot set: saves its counts every SAVE_INTERVAL_S and at `close`.
    Holds the experts only weakly, so a model dropped without close is still freed."""

    def __init__(self, local: LocalExperts, seeded: dict[tuple[int, int], int], warmed: int):
        self.manifest = local.manifest
        self.seeded = seeded
        self.warmed = warmed
        self._local = weakref.ref(local)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hot-set", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAVE_INTERVAL_S):
            self.save()

    def save(self) -> None:
        """Saves the counts unless nothing was routed since load; never fails the run."""
        local = self._local()
        if local is None:
            return
        with self._lock:
            counts = local.routing_counts()
            if counts == self.seeded:
                return
            try:
                save_counts(self.manifest, counts)
            except (OSError, ManifestError) as exc:
                log.warning("could not save the learned hot set (%s); the next run starts colder", exc)

    def close(self, save: bool = True) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if save:
            self.save()


def attach(local: LocalExperts) -> HotSet:
    """Seeds the experts' counts from the saved hot set and warms the cache with the
    hottest that fit; the returned HotSet saves them again."""
    seeded = seed(load_counts(local.manifest))
    warmed = 0
    if seeded:
        local.seed_counts(seeded)
        try:
            warmed = local.warm()
            log.info("learned hot set: warmed the cache with %d experts", warmed)
        except EdgemoeError as exc:
            # Warming is only a head start: a bad expert file fails the request that needs it
            # (and /health says so), not the start.
            log.warning("learned hot set: warming the cache stopped: %s", exc)
    return HotSet(local, local.routing_counts(), warmed)
