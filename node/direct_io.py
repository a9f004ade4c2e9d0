"""Reading around the page cache: O_DIRECT on Linux, F_NOCACHE on macOS."""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

from .limits import DIRECT_ALIGNMENT

log = logging.getLogger(__name__)

O_DIRECT = getattr(os, "O_DIRECT", 0)


def bypass_page_cache(fd: int, path: Path) -> tuple[int, bool]:
    """Reopens with O_DIRECT (Linux) or sets F_NOCACHE (macOS); returns the fd and whether
    its reads now bypass the page cache (not where the file system refuses direct I/O)."""
    if O_DIRECT:
        try:
            direct = os.open(path, os.O_RDONLY | O_DIRECT)
        except OSError:
            log.warning("%s does not support direct I/O; reading it through the page cache", path)
            return fd, False
        # Some file systems accept O_DIRECT at open and refuse the reads: try one.
        try:
            os.preadv(direct, [mmap.mmap(-1, DIRECT_ALIGNMENT)], 0)
        except OSError:
            os.close(direct)
            log.warning("%s refuses direct reads; reading it through the page cache", path)
            return fd, False
        os.close(fd)
        return direct, True
    import fcntl

    if hasattr(fcntl, "F_NOCACHE"):
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd, True
    log.warning("this OS cannot bypass the page cache; reading %s through it", path)
    return fd, False
