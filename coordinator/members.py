"""Nodes joining and leaving a running cluster (discovery's NodeWatcher adds and removes them).

`peers` is replaced, never changed in place, so a reader (the dispatcher, once per layer;
the push loop, once per pass) always iterates one whole list without taking a lock.
"""

from __future__ import annotations

import logging
import threading

from .peers import Peer

log = logging.getLogger(__name__)


def peer_label(peer: Peer) -> str:
    """`NAME (HOST:PORT)`, what `push` shows: nodes of one host name stay apart."""
    return peer.address if peer.name == peer.address else f"{peer.name} ({peer.address})"


class Members:
    peers: list[Peer]
    # Serialises writers only; shared by every cluster of the process (changes are rare).
    _members_lock = threading.Lock()

    def add_peer(self, peer: Peer) -> None:
        """Use `peer` (connected or not: a failed one is retried as at start) from the next layer on."""
        with self._members_lock:
            if any(p.address == peer.address for p in self.peers):
                peer.close()
                return
            self.peers = [*self.peers, peer]
        log.info("node %s (%s) joined", peer.name, peer.address)

    def remove_peer(self, address: str, why: str) -> bool:
        """Stop using the node at `address`; what it was computing is computed here. False if unknown."""
        with self._members_lock:
            gone = [p for p in self.peers if p.address == address]
            self.peers = [p for p in self.peers if p.address != address]
        for peer in gone:
            peer.mark_failed(f"node {peer.name} ({address}) left: {why}")
            peer.close()
            log.info("node %s (%s) left: %s", peer.name, address, why)
        return bool(gone)
