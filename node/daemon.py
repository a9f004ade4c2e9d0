"""`edge-node`: the daemon other devices run. Cluster mode is not built yet."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "edge-node: cluster mode is not available in this edgemoe version yet; "
        "run models on one machine with `edgemoe generate`",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
