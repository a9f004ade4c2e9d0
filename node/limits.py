"""Limits and facts about the machine and environment, each with one source of truth here."""

from __future__ import annotations

import os


def ram_bytes() -> int:
    """This machine's physical RAM, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
