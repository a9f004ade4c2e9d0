"""Keep browsing while `serve`, `chat` and `generate` run (`--peers auto`): a node that
starts advertising joins the cluster within WATCH_S, one that withdraws its advertisement
(or whose records expire) leaves it, and its experts are computed here again."""

from __future__ import annotations

import logging
import threading

from edgemoe.node.addresses import format_address
from edgemoe.node.credentials import ClusterCredentials

from .cluster import Cluster
from .discovery import PeerBrowser
from .peers import Peer

log = logging.getLogger(__name__)

WATCH_S = 1.0
# Anyone on the LAN can advertise with our (public) cluster id; each advertised node costs a
# connection attempt and a place in the cluster's lists, so only this many are taken in.
MAX_WATCHED_NODES = 64


class NodeWatcher:
    """Follows the browsers' view into `follow`ed cluster (one at a time: `serve` may load again)."""

    def __init__(self, browsers: list[PeerBrowser], credentials: ClusterCredentials, every_s: float = WATCH_S,
                 max_nodes: int = MAX_WATCHED_NODES):
        self._browsers = browsers
        self._credentials = credentials
        self._every_s = every_s
        self._max_nodes = max_nodes
        self._cluster: Cluster | None = None
        self._full_logged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-watcher")
        self._thread.start()

    def follow(self, cluster: Cluster | None) -> None:
        self._cluster = cluster

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.sync()
            except Exception as exc:  # a bad moment (a closing cluster, a vanished interface) is retried
                log.warning("following nodes over mDNS: %s", exc)

    def sync(self) -> None:
        """One look: add the nodes advertised now, remove those no longer advertised."""
        cluster = self._cluster
        if cluster is None:
            return
        seen = {format_address(p.host, p.port): p for b in self._browsers for p in b.peers()}
        for address in sorted({p.address for p in cluster.peers} - set(seen)):
            cluster.remove_peer(address, "it no longer advertises itself over mDNS")
        for address, found in sorted(seen.items()):
            if any(p.address == address for p in cluster.peers):
                continue
            if len(cluster.peers) >= self._max_nodes:
                if not self._full_logged:
                    log.warning("not taking in node %s (%s): already %d nodes", found.name, address, self._max_nodes)
                    self._full_logged = True
                return
            peer = Peer(address, self._credentials, cluster.manifest)
            peer.connect(cluster.manifest.fingerprint)  # a failed one is retried like any other
            if self._stop.is_set() or self._cluster is not cluster:
                peer.close()
                return
            cluster.add_peer(peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for browser in self._browsers:
            browser.close()
