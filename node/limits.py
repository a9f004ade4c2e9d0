"""Limits and facts about the machine and environment, each with one source of truth here."""

from __future__ import annotations

import os


def ram_bytes() -> int:
    """This machine's physical RAM, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# A prompt can route to every expert of a layer at once; holding them all would break
# the memory bound, so a layer's experts are brought into slots this many at a time.
MAX_INFLIGHT_EXPERTS = 32
# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block;
# 4 KiB covers the drives edgemoe runs on.
DIRECT_ALIGNMENT = 4096
# gRPC's cap on one message, each way: a push chunk or a layer's compute request.
MAX_MESSAGE_BYTES = 64 * 2**20
