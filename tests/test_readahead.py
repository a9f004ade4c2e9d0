"""`--prefetch` through the page cache: the kernel is asked to read the guessed experts ahead,
exactly those, and a guess leaves nothing of ours written."""

import errno
import mmap
import os
import shutil
import time

import numpy as np
import pytest
from conftest import unavailable

from edgemoe.coordinator.bench.page_cache import drop_page_cache, expert_paths, resident_pages
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import read_manifest
from edgemoe.node.store import ExpertStore


def _record_pages(spec, expert: int) -> tuple[int, set[int]]:
    """The file index and pages of one expert's record."""
    segments = spec.experts[expert].segments
    assert len({s.file for s in segments}) == 1
    pages = {p for s in segments for p in range(s.offset // mmap.PAGESIZE, -(-(s.offset + s.length) // mmap.PAGESIZE))}
    return segments[0].file, pages


@pytest.fixture
def packed(models, tmp_path):
    """A private copy: dropping its page cache disturbs no other test."""
    dst = tmp_path / "packed"
    shutil.copytree(models.packed("qwen3_moe", True), dst)
    return dst


def test_readahead_brings_exactly_the_guessed_records_into_the_page_cache(packed):
    if not hasattr(os, "posix_fadvise"):
        unavailable("this OS has no posix_fadvise: --prefetch reads into slots there")
    manifest = read_manifest(packed)
    paths = expert_paths(packed, manifest)
    spec = manifest.layers[1]
    store = ExpertStore(packed, manifest, io_mode="buffered")
    try:
        assert store.can_advise
        drop_page_cache(paths)
        before = [resident_pages(p) for p in paths]
        if any(p is None or p.any() for p in before):
            unavailable("the page cache cannot be dropped or inspected here")
        guessed, others = [2, 7], [e for e in range(spec.num_experts) if e not in (2, 7)]
        store.advise(spec.layer, guessed)
        asked = {(f, p) for e in guessed for f, pages in [_record_pages(spec, e)] for p in pages}
        # WILLNEED only starts the reads: wait (a bounded while) for them to land.
        deadline = time.monotonic() + 10
        while True:
            now = [resident_pages(p) for p in paths]
            read_ahead = {(f, p) for f, pages in enumerate(now) for p in np.flatnonzero(pages).tolist()}
            if asked <= read_ahead or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert asked <= read_ahead, f"not read ahead: {sorted(asked - read_ahead)}"
        # Nothing else: the files are opened POSIX_FADV_RANDOM, so no neighbour is pulled in.
        assert read_ahead == asked, sorted(read_ahead - asked)
        assert others and store.stats.reads == 0  # nothing was read by us
    finally:
        store.close()


def test_a_wrong_readahead_guess_costs_no_slot_and_no_wait(packed):
    """Guessed experts the layer does not ask for leave the cache and the slots as they were;
    those it asks for are read as misses, and counted as the prefetch's. Once the layer has
    asked, the rest of the guess is forgotten; another layer asking first (a node's fallback
    in the guessing layer) does not forget it; the end of a generation does."""
    if not hasattr(os, "posix_fadvise"):
        unavailable("this OS has no posix_fadvise: --prefetch reads into slots there")
    manifest = read_manifest(packed)
    spec, before = manifest.layers[1], manifest.layers[0]
    local = LocalExperts(ExpertStore(packed, manifest, io_mode="buffered"), 8 * spec.record_bytes,
                         prefetch_experts=2)
    try:
        group = local._group_of[spec.layer]
        assert group.prefetch_slots == 0  # readahead needs no bank of slots
        local.prefetch(spec.layer, [1, 2, 3, 4])
        assert local.stats.prefetched == 4 and local.cached_experts == 0
        local.slots(before.layer, [2])  # the guessing layer's own fallback
        assert (local.stats.prefetch_used, local.stats.experts_from_ssd) == (0, 1)
        local.slots(spec.layer, [2, 9])
        assert (local.stats.prefetch_used, local.stats.experts_from_ssd) == (1, 2)
        assert local.cached_experts == 3 and (spec.layer, 1) not in local
        local.slots(spec.layer, [3])  # guessed, but asked for after the guess's layer was done
        assert (local.stats.prefetch_used, local.stats.experts_from_ssd) == (1, 3)
        local.prefetch(spec.layer, [5])
        local.settle(everything=True)  # the generation ended before the layer asked
        local.slots(spec.layer, [5])
        assert (local.stats.prefetch_used, local.stats.experts_from_ssd) == (1, 4)
    finally:
        local.close()


def test_auto_reads_ahead_small_experts_and_guesses_one_large_one_into_a_slot(packed, monkeypatch):
    from edgemoe.node import prefetch as prefetch_module

    manifest = read_manifest(packed)
    for large in (False, True):
        # The threshold, not the model, makes its experts "large" here.
        monkeypatch.setattr(prefetch_module, "READAHEAD_MAX_RECORD_BYTES",
                            manifest.expert_bytes - 1 if large else manifest.expert_bytes)
        for io_mode in ("buffered", "direct"):
            store = ExpertStore(packed, manifest, io_mode=io_mode)
            try:
                if store.can_advise:  # read through the page cache: the kernel's readahead, of small experts only
                    expected = not large
                else:  # around it (direct I/O; a file system that refuses it leaves the files buffered)
                    expected = large and store.any_direct
                assert prefetch_module.prefetch_chosen(store) is expected, (io_mode, large)
                if store.any_direct:
                    assert prefetch_module.prefetch_chosen(store, slots_allowed=False) is False
            finally:
                store.close()


def test_a_refused_readahead_turns_prefetch_off_and_loses_no_token(models, monkeypatch, caplog):
    from conftest import PROMPT, encode, mlx_lm_tokens

    from edgemoe.coordinator.generate import generate
    from edgemoe.coordinator.loader import load_streaming_model

    if not hasattr(os, "posix_fadvise"):
        unavailable("this OS has no posix_fadvise: --prefetch reads into slots there")

    def refused(self, layer, experts):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ExpertStore, "advise", refused)
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, models=models)
    caplog.set_level("WARNING", logger="edgemoe.node.prefetch")
    sm = load_streaming_model(packed, cache_bytes=2 * read_manifest(packed).expert_bytes, io_mode="buffered",
                              prefetch=True)
    try:
        result = generate(sm, prompt, max_tokens=len(expected))
        assert result.token_ids == expected
        warnings = [r.getMessage() for r in caplog.records if "read ahead" in r.getMessage()]
        assert len(warnings) == 1 and "Invalid argument" in warnings[0]
        # One refused guess, then none: the layers stop guessing.
        assert sm.guesses()[0] == 2 * sm.config["num_experts_per_tok"]
        assert result.stats.experts_prefetched == 0
        assert sm.local.prefetch_width == 0 and not sm.local.reads_ahead  # what the bench reports
    finally:
        sm.close()
