"""Discovery: zeroconf advertisement and browsing on loopback and between network namespaces,
static peers, and the delaying relay the cluster tests use.

Every mDNS socket here is bound to 127.0.0.1 or to an address inside a
namespace the test made; passive captures check that nothing carrying this
test's ids shows up on the root namespace's other interfaces. Each capture first
proves it sees what it should (the test's mDNS on loopback or on the namespaces'
bridge, or a probe of its own), so "nothing seen" means nothing was there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import netns
import pytest
from conftest import in_ci

from edgemoe.coordinator.discovery import DiscoveredPeer, PeerBrowser
from edgemoe.node.addresses import parse_static_peers
from edgemoe.node.advertise import TXT_STRING_MAX, NodeAdvertisement, build_txt, models_txt
from edgemoe.node.errors import DuplicateNodeError, EdgemoeError, PeerAddressError

PROTO = 7
TIMEOUT = 15.0


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def new_id() -> str:
    return uuid.uuid4().hex


SNIFF = """
import json, signal, socket, sys, threading
needles = json.loads(sys.argv[1])
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # every protocol, every interface
sock.settimeout(0.05)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
print("SNIFFING", flush=True)
seen = {}
while True:
    try:
        data, addr = sock.recvfrom(65535)
    except TimeoutError:
        if done.is_set():  # stops only once what arrived before SIGTERM is read
            break
        continue
    for n in needles:
        if n.encode() in data:
            seen.setdefault(n, {}).setdefault(addr[0], 0)
            seen[n][addr[0]] += 1
print(json.dumps(seen), flush=True)
"""


class Sniffer:
    """Passive capture (AF_PACKET, sends nothing) of the packets that carry any of `needles`,
    on every interface of the root namespace, or of namespace `ns`."""

    def __init__(self, needles: list[str], ns: netns.Namespace | None = None) -> None:
        argv = [sys.executable, "-c", SNIFF, json.dumps(needles)]
        if ns is None:
            err = tempfile.NamedTemporaryFile("w+", prefix="edgemoe-sniff-", suffix=".err")
            self.proc = netns.Proc(argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True), err)
        else:
            self.proc = netns.run_in(ns, argv)
        self.proc.wait_for_line(lambda line: line == "SNIFFING", TIMEOUT)
        self.seen: dict[str, dict[str, int]] | None = None

    def stop(self) -> dict[str, dict[str, int]]:
        """{needle: {interface: packets}} of everything captured; stops the capture."""
        if self.seen is None:
            self.proc.popen.terminate()
            self.seen = json.loads(self.proc.wait_for_line(lambda line: line.startswith("{"), TIMEOUT))
            self.proc.stop()
        return self.seen

    def interfaces(self, *needles: str) -> set[str]:
        """The interfaces where packets carrying any of `needles` were seen."""
        seen = self.stop()
        return {iface for n in needles for iface in seen.get(n, {})}


def loopback_probe(needle: str) -> None:
    """One UDP datagram carrying `needle` to a closed port on 127.0.0.1: a root capture must see it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(f"probe {needle}".encode(), ("127.0.0.1", 9))


@pytest.fixture
def sniffer_factory():
    sniffers: list[Sniffer] = []

    def make(needles: list[str], ns: netns.Namespace | None = None) -> Sniffer | None:
        if os.geteuid() != 0:
            if in_ci():
                pytest.fail("capturing packets needs root, and CI must check that mDNS stays off real interfaces")
            return None  # not root: the leak check is skipped, discovery is still tested
        s = Sniffer(needles, ns)
        sniffers.append(s)
        return s

    yield make
    for s in sniffers:
        s.proc.stop()


@pytest.fixture
def adverts():
    """NodeAdvertisements made by a test; all withdrawn at the end, whatever happened."""
    made: list[NodeAdvertisement] = []

    def make(**kw) -> NodeAdvertisement:
        kw.setdefault("name", "node")
        kw.setdefault("port", 50051)
        kw.setdefault("address", "127.0.0.1")
        kw.setdefault("protocol_version", PROTO)
        kw.setdefault("fingerprints", [])
        adv = NodeAdvertisement(**kw)
        made.append(adv)
        return adv

    yield make
    for adv in made:
        adv.close()


@pytest.fixture
def browsers():
    made: list[PeerBrowser] = []

    def make(*args, **kw) -> PeerBrowser:
        b = PeerBrowser(*args, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


# ---------------------------------------------------------------- loopback


def test_loopback_discovery_filters_duplicates_and_withdrawal(adverts, browsers, sniffer_factory, caplog):
    caplog.set_level(logging.INFO, logger="edgemoe.coordinator.discovery")
    # Random cluster ids: other test runs on this machine share loopback mDNS.
    cluster, other_cluster = new_id()[:12], new_id()[:12]
    fingerprints = ["a1" * 32, "b2" * 32]
    ours = adverts(node_id=new_id(), name="alpha node", port=50101, cluster_id=cluster, fingerprints=fingerprints)
    stranger = adverts(node_id=new_id(), name="stranger", port=50102, cluster_id=other_cluster)
    newer = adverts(node_id=new_id(), name="newer", port=50103, cluster_id=cluster, protocol_version=PROTO + 1)
    sniffer = sniffer_factory([ours.node_id, stranger.node_id, cluster])

    mine = browsers("127.0.0.1", cluster_id=cluster, protocol_version=PROTO)
    everyone = browsers("127.0.0.1")
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(NodeAdvertisement.register, [ours, stranger, newer]))

    ids = {ours.node_id, stranger.node_id, newer.node_id}
    wait_until(lambda: ids <= {p.node_id for p in everyone.peers()}, what="the unfiltered browser to see 3 nodes")
    found = wait_until(lambda: [p for p in mine.peers() if p.node_id == ours.node_id], what="our node")
    peer = found[0]
    assert isinstance(peer, DiscoveredPeer)
    assert (peer.name, peer.host, peer.port, peer.protocol_version, peer.cluster_id) == (
        "alpha node", "127.0.0.1", 50101, PROTO, cluster,
    )
    assert peer.fingerprints == [fp[:16] for fp in fingerprints]
    assert peer.last_seen <= time.monotonic()
    # Another cluster's node and another protocol's node are seen on the wire but left out.
    assert {p.node_id for p in mine.peers()} & ids == {ours.node_id}

    # A second node with the same id is refused before it announces anything.
    twin = adverts(node_id=ours.node_id, name="twin", port=50104, cluster_id=cluster)
    with pytest.raises(DuplicateNodeError) as err:
        twin.register()
    assert "\n" not in str(err.value) and "already advertised" in str(err.value)
    assert "127.0.0.1:50101" in str(err.value)
    assert isinstance(err.value, EdgemoeError)
    assert [p.port for p in mine.peers() if p.node_id == ours.node_id] == [50101]

    # A changed model list reaches the browser; a rejected node that re-announces is not logged again.
    ours.update_fingerprints(["c3" * 32])
    stranger.update_fingerprints(["d4" * 32])
    wait_until(
        lambda: [p.fingerprints for p in mine.peers() if p.node_id == ours.node_id] == [["c3" * 8]],
        what="the updated fingerprints",
    )
    wait_until(
        lambda: [p.fingerprints for p in everyone.peers() if p.node_id == stranger.node_id] == [["d4" * 8]],
        what="the stranger's update",
    )

    ours.close()
    wait_until(lambda: ours.node_id not in {p.node_id for p in mine.peers()}, what="the browser to drop the node")

    # Each rejected node is logged once, however often it re-announces.
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
    rejections = [m for m in ignored if stranger.node_id in m]
    assert len(rejections) == 1 and "another cluster" in rejections[0]
    proto_rejections = [m for m in ignored if newer.node_id in m]
    assert len(proto_rejections) == 1 and f"protocol {PROTO + 1}" in proto_rejections[0]

    if sniffer is not None:
        where = sniffer.interfaces(ours.node_id, stranger.node_id, cluster)
        assert "lo" in where, "the capture saw none of this test's mDNS on loopback: it is not working"
        assert where == {"lo"}, f"mDNS carrying this test's ids left on {where - {'lo'}}"


async def test_advertise_and_browse_from_an_event_loop(adverts, browsers):
    """The daemon is asyncio: zeroconf must not attach to its loop and then refuse blocking calls."""
    cluster = new_id()[:12]
    browser = browsers("127.0.0.1", cluster_id=cluster)
    blocking = adverts(node_id=new_id(), cluster_id=cluster, duplicate_check_ms=200)
    awaited = adverts(node_id=new_id(), cluster_id=cluster, duplicate_check_ms=200)
    task = asyncio.create_task(awaited.async_register())
    await asyncio.sleep(0.05)  # its worker thread is running now, in parallel with the next line
    blocking.register()  # called on the loop's thread: blocks it, but works
    await task
    wanted = {blocking.node_id, awaited.node_id}
    deadline = time.monotonic() + TIMEOUT
    while {p.node_id for p in browser.peers()} != wanted:
        assert time.monotonic() < deadline, "the browser did not find both nodes"
        await asyncio.sleep(0.02)
    await awaited.async_close()
    blocking.close()


def test_advertisement_close_is_idempotent_and_validates(adverts):
    adv = adverts(node_id=new_id(), cluster_id="c")
    adv.close()
    adv.close()
    with pytest.raises(ValueError):
        NodeAdvertisement("bad.id", "n", 1, "127.0.0.1", PROTO, "c", [])
    with pytest.raises(ValueError):
        NodeAdvertisement(new_id(), "n", 70000, "127.0.0.1", PROTO, "c", [])


def test_txt_strings_fit_255_bytes():
    fingerprints = [f"{i:064x}" for i in range(40)]
    models = models_txt(fingerprints)
    assert len(b"models=" + models.encode()) <= TXT_STRING_MAX
    kept = models.split(",")
    assert 10 < len(kept) < 40 and kept == [fp[:16] for fp in fingerprints[: len(kept)]]
    txt = build_txt("n1", "ü" * 300, PROTO, "cl", fingerprints)
    for key, value in txt.items():
        assert len(f"{key}={value}".encode()) <= TXT_STRING_MAX
    assert txt["name"].startswith("üü") and txt["proto"] == str(PROTO)
    with pytest.raises(ValueError):
        build_txt("n1", "n", PROTO, "x" * 300, [])


# ---------------------------------------------------------------- static peers


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("10.0.0.2:50051", [("10.0.0.2", 50051)]),
        ("a.local:1, b:65535", [("a.local", 1), ("b", 65535)]),
        ("[::1]:7000,[fe80::1]:7001", [("::1", 7000), ("fe80::1", 7001)]),
        ("h:5,h:5,g:6", [("h", 5), ("g", 6)]),
    ],
)
def test_parse_static_peers(spec, expected):
    assert parse_static_peers(spec) == expected


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "no peers"),
        ("   ", "no peers"),
        ("host", "no port"),
        ("host:", "port ''"),
        ("host:0", "1-65535"),
        ("host:65536", "1-65535"),
        ("host:80x", "1-65535"),
        ("host:-1", "1-65535"),
        ("a:1,,b:2", "empty entry"),
        ("a:1,", "empty entry"),
        (":80", "no host"),
        ("::1:80", "brackets"),
        ("[::1]", "no port"),
        ("[::1]:", "1-65535"),
        ("[10.0.0.1]:80", "not an IPv6"),
        ("[::1:80", "no port"),
        ("bad host:80", "not a host name"),
    ],
)
def test_parse_static_peers_errors(spec, says):
    with pytest.raises(PeerAddressError) as err:
        parse_static_peers(spec)
    message = str(err.value)
    assert says in message and "\n" not in message and "HOST:PORT" in message


# ---------------------------------------------------------------- delaying relay


class EchoServer:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        got += chunk
    return bytes(got)


def test_delay_relay_adds_delay_and_keeps_bytes():
    echo = EchoServer()
    delay = 0.05
    try:
        with netns.DelayRelay(echo.address, delay_s=delay, max_lifetime_s=30) as relay:
            with socket.create_connection(relay.address, timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(3):
                    t = time.perf_counter()
                    assert round_trip(s, b"ping") == b"ping"
                    assert time.perf_counter() - t >= 2 * delay
                payload = uuid.uuid4().bytes * 40000  # 640 KB, many chunks
                t = time.perf_counter()
                assert round_trip(s, payload) == payload
                assert time.perf_counter() - t >= 2 * delay
        with pytest.raises(OSError):
            socket.create_connection(relay.address, timeout=2).close()
    finally:
        echo.close()


def test_delay_relay_stops_itself_after_its_lifetime():
    echo = EchoServer()
    try:
        relay = netns.DelayRelay(echo.address, delay_s=0.001, max_lifetime_s=0.2).start()
        wait_until(lambda: relay._stopped.is_set(), timeout=5, what="the relay's lifetime to end")
        with pytest.raises(OSError):
            socket.create_connection(relay.address, timeout=2).close()
        relay.stop()
    finally:
        echo.close()


# ---------------------------------------------------------------- network namespaces


ADVERTISE = """
import json, logging, signal, sys, threading
from edgemoe.node.advertise import NodeAdvertisement
from edgemoe.node.errors import DuplicateNodeError
logging.basicConfig(level=logging.INFO)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
adv = NodeAdvertisement(**json.loads(sys.argv[1]))
try:
    adv.register()
except DuplicateNodeError as e:
    print("DUPLICATE", e, flush=True)
    sys.exit(3)
print("REGISTERED", flush=True)
done.wait(60)
adv.close()
print("WITHDRAWN", flush=True)
"""

BROWSE = """
import dataclasses, json, signal, sys, threading
from edgemoe.coordinator.discovery import PeerBrowser
cfg = json.loads(sys.argv[1])
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
mine = PeerBrowser(cfg["address"], cluster_id=cfg["cluster"], protocol_version=cfg["proto"])
everyone = PeerBrowser(cfg["address"])
def snap(b):
    return sorted((dict(dataclasses.asdict(p), last_seen=None) for p in b.peers()), key=lambda p: p["node_id"])
last = None
while not done.wait(0.05):
    now = {"mine": snap(mine), "everyone": snap(everyone)}
    if now != last:
        print(json.dumps(now), flush=True)
        last = now
mine.close(); everyone.close()
"""


def python(script: str, cfg: dict) -> list[str]:
    return [sys.executable, "-c", script, json.dumps(cfg)]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def lan():
    """Three namespaces on a bridge (in a fourth, hub namespace); all removed afterwards.
    Its tests are marked `netns`: they run only where namespaces work (conftest)."""
    with netns.Lan(3) as made:
        names = {ns.name for ns in [made.hub, *made.hosts]}
        yield made
    left = names & netns_names()
    assert not left, f"namespaces left behind: {left}"


def node_ids(snapshot: dict, which: str) -> set[str]:
    return {p["node_id"] for p in snapshot[which]}


@pytest.mark.netns
def test_discovery_between_namespaces(lan, sniffer_factory):
    a, b, c = lan.hosts
    cluster = new_id()[:12]
    node = {"node_id": new_id(), "name": "ns-a", "port": 50051, "address": a.address,
            "protocol_version": PROTO, "cluster_id": cluster, "fingerprints": ["f" * 64]}
    stranger = dict(node, node_id=new_id(), name="ns-c", address=c.address, cluster_id="someone-else")
    ids = [node["node_id"], stranger["node_id"], cluster]
    # The namespaces' bridge must carry this test's mDNS, and the root namespace not a single packet of it.
    on_bridge = sniffer_factory(ids, lan.hub)
    probe = new_id()
    in_root = sniffer_factory([*ids, probe])

    browser = netns.run_in(b, python(BROWSE, {"address": b.address, "cluster": cluster, "proto": PROTO}))
    advertiser = netns.run_in(a, python(ADVERTISE, node))
    other = netns.run_in(c, python(ADVERTISE, stranger))
    advertiser.wait_for_line(lambda s: s == "REGISTERED", TIMEOUT)
    other.wait_for_line(lambda s: s == "REGISTERED", TIMEOUT)

    line = browser.wait_for_line(
        lambda s: s.startswith("{")
        and {node["node_id"], stranger["node_id"]} <= node_ids(json.loads(s), "everyone")
        and node["node_id"] in node_ids(json.loads(s), "mine"),
        TIMEOUT,
    )
    snapshot = json.loads(line)
    assert node_ids(snapshot, "mine") == {node["node_id"]}
    seen = snapshot["mine"][0]
    assert (seen["host"], seen["port"], seen["name"], seen["cluster_id"], seen["protocol_version"]) == (
        a.address, 50051, "ns-a", cluster, PROTO,
    )
    assert seen["fingerprints"] == ["f" * 16]

    # The same node id from another host is refused over real mDNS.
    twin = netns.run_in(c, python(ADVERTISE, dict(node, name="twin", address=c.address)))
    line = twin.wait_for_line(lambda s: s.startswith("DUPLICATE"), TIMEOUT)
    assert a.address in line
    assert twin.popen.wait(TIMEOUT) == 3

    # SIGTERM withdraws the advertisement; the browser in the other namespace drops the node.
    advertiser.popen.terminate()
    advertiser.wait_for_line(lambda s: s == "WITHDRAWN", TIMEOUT)
    browser.wait_for_line(
        lambda s: s.startswith("{") and node["node_id"] not in node_ids(json.loads(s), "everyone"),
        TIMEOUT,
    )
    assert advertiser.popen.wait(TIMEOUT) == 0

    # Each capture sees what it should: the bridge the nodes' mDNS, the root its own loopback probe.
    assert on_bridge.interfaces(node["node_id"]) >= {"br0", "h0"}, on_bridge.stop()
    loopback_probe(probe)
    assert in_root.interfaces(probe) == {"lo"}, "the root capture did not see its probe: it is not working"
    where = in_root.interfaces(*ids)
    assert not where, f"this test's mDNS reached the root namespace on {where}"


ECHO = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], 0))
print("LISTENING", srv.getsockname()[1], flush=True)
def echo(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

CLIENT = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(3):
    t = time.perf_counter(); s.sendall(b"x" * 1000); got = b""
    while len(got) < 1000:
        got += s.recv(65536)
    rtts.append(time.perf_counter() - t)
print(json.dumps({"rtts": rtts, "ok": got == b"x" * 1000}), flush=True)
"""


@pytest.mark.netns
def test_relay_between_namespaces(lan):
    """The cluster tests' set-up: node in one namespace, a delaying relay next to the coordinator."""
    a, b, _ = lan.hosts
    server = netns.run_in(a, [sys.executable, "-c", ECHO, a.address])
    port = int(server.wait_for_line(lambda s: s.startswith("LISTENING"), TIMEOUT).split()[1])
    delay = 0.02
    relay, relay_port = netns.run_relay_in(b, (a.address, port), delay, listen_host="127.0.0.1")
    result = b.run([sys.executable, "-c", CLIENT, "127.0.0.1", str(relay_port)], timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"]
    assert min(report["rtts"]) >= 2 * delay
    assert relay.stop() == 0


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.netns
def test_namespace_cleanup_kills_processes():
    with netns.Namespace() as ns:
        proc = netns.run_in(ns, [sys.executable, "-c", "import time; print('UP', flush=True); time.sleep(60)"])
        proc.wait_for_line(lambda s: s == "UP", TIMEOUT)
        # A grandchild the Proc does not know of is killed too.
        orphan = int(ns.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
        name = ns.name
    assert proc.popen.poll() is not None
    wait_until(lambda: not _running(orphan), timeout=5, what="the orphan in the namespace to die")
    assert name not in netns_names()
    assert not Path(f"/run/netns/{name}").exists()


SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "netns-cluster.sh"


def root_links_and_addresses() -> str:
    return "".join(
        subprocess.run(["ip", "-o", *args], capture_output=True, text=True, check=True).stdout
        for args in (["link"], ["addr"])
    )


@pytest.mark.netns
def test_netns_cluster_script_up_and_down(tmp_path):
    prefix = f"{netns.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:4]}-"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = dict(os.environ, EDGEMOE_NETNS_PREFIX=prefix, EDGEMOE_NETNS_STATE=str(state))

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)

    before = root_links_and_addresses()
    try:
        up = script("up", "2")
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {prefix}node2 " in up.stdout and "--interface 10.213.1.12" in up.stdout
        assert script("up", "2").returncode == 1  # refuses to stack a second cluster
        assert {f"{prefix}{n}" for n in ("hub", "coord", "node1", "node2")} <= netns_names()
        assert root_links_and_addresses() == before, "the script touched the root namespace's interfaces"

        node1 = netns.Namespace(name=f"{prefix}node1")
        server = netns.run_in(node1, [sys.executable, "-c", ECHO, "10.213.1.11"])
        port = server.wait_for_line(lambda s: s.startswith("LISTENING"), TIMEOUT).split()[1]
        coord = netns.Namespace(name=f"{prefix}coord")
        result = coord.run([sys.executable, "-c", CLIENT, "10.213.1.11", port], timeout=TIMEOUT)
        assert result.returncode == 0 and json.loads(result.stdout)["ok"], result.stderr
    finally:
        down = script("down")
    assert down.returncode == 0, down.stderr
    assert not any(name.startswith(prefix) for name in netns_names())
    assert server.popen.wait(5) is not None


@pytest.mark.netns
def test_stale_namespaces_of_dead_runs_are_swept(monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-{uuid.uuid4().hex[:6]}"
    live = netns.Namespace()  # named after this (live) process: never swept
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with live:
            monkeypatch.setattr(netns, "STALE_AFTER_S", 0)
            assert stale in netns.sweep_stale()
            assert live.name in netns_names() and stale not in netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


# --- --interface: an address or an interface name; a wrong one is one line; a lost one comes back ---

ABSENT_ADDRESS = "203.0.113.77"  # TEST-NET-3: on no machine's interface
ABSENT_INTERFACE = "nosuchif0"


class _Adapter:
    def __init__(self, name: str, *ips: str):
        self.nice_name = name
        self.ips = [type("IP", (), {"ip": ip})() for ip in ips]


def test_interface_names_resolve_and_follow_their_address(monkeypatch):
    from edgemoe.node import interfaces

    adapters = [_Adapter("lo", "127.0.0.1", ("::1", 0, 0)),
                _Adapter("eth0", ("fe80::1", 0, 2), "10.9.8.7", ("fd00::7", 0, 0))]
    monkeypatch.setattr(interfaces.ifaddr, "get_adapters", lambda: adapters)
    assert interfaces.resolve_interface("eth0") == "10.9.8.7"
    assert interfaces.resolve_interface("fd00::7") == "fd00::7"
    adapters[1] = _Adapter("eth0", "10.9.8.99")  # a DHCP renewal gave it another address
    assert interfaces.interface_address("eth0") == "10.9.8.99"
    assert interfaces.interface_address("10.9.8.7") is None
    for wrong in ("10.9.8.7", ABSENT_INTERFACE):
        with pytest.raises(interfaces.InterfaceError, match=f"--interface {wrong}: .*eth0 \\(10.9.8.99\\)"):
            interfaces.resolve_interface(wrong)


@pytest.mark.parametrize("interface", [ABSENT_ADDRESS, ABSENT_INTERFACE])
def test_a_wrong_interface_stops_edge_node_and_peers_with_one_line(interface, tmp_path):
    """They used to crash with a traceback (a crash loop under systemd). Both fail before any mDNS."""
    from edgemoe.node.credentials import format_token, new_secret

    node = subprocess.run([sys.executable, "-m", "edgemoe.node.daemon", "--join", format_token(new_secret()),
                           "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "node"), "--interface", interface],
                          capture_output=True, text=True, timeout=60)
    cli = [sys.executable, "-m", "edgemoe.coordinator.cli"]
    subprocess.run([*cli, "cluster", "init", "--dir", str(tmp_path / "cluster")], capture_output=True, check=True,
                   timeout=60)
    peers = subprocess.run([*cli, "peers", "--interface", interface, "--cluster-dir", str(tmp_path / "cluster")],
                           capture_output=True, text=True, timeout=60)
    for out in (node, peers):
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and len(lines) == 1, out.stderr
        assert f"--interface {interface}" in lines[0] and "Traceback" not in out.stderr


class _FakeAd:
    """Stands in for NodeAdvertisement: no mDNS, registrations recorded."""

    def __init__(self, address: str, log: list, fail: bool = False):
        self.address, self.log, self.fail = address, log, fail

    async def async_register(self) -> None:
        if self.fail:
            raise OSError(99, "Cannot assign requested address")
        self.log.append(("register", self.address))

    async def async_close(self) -> None:
        self.log.append(("close", self.address))
        raise OSError(101, "Network is unreachable")  # goodbyes cannot leave a vanished address


def test_a_lost_address_is_advertised_again_when_it_returns():
    from edgemoe.node.advertise import KeptAdvertisement

    log: list = []
    now = {"address": "10.1.2.3", "fail": False}
    kept = KeptAdvertisement("eth0", lambda a: _FakeAd(a, log, now["fail"]), lookup=lambda _: now["address"],
                             recheck_s=3600)

    async def scenario() -> None:
        await kept.start()
        await kept.check()  # nothing changed: nothing happens
        now["address"] = None  # the cable is pulled
        await kept.check()
        assert kept.current is None
        now.update(address="10.1.2.3", fail=True)  # back, but not usable yet
        await kept.check()
        assert kept.current is None
        now["fail"] = False
        await kept.check()
        now["address"] = "10.1.2.4"  # DHCP gave another address
        await kept.check()
        kept._task.cancel()
        kept.current = None

    asyncio.run(scenario())
    assert log == [("register", "10.1.2.3"), ("close", "10.1.2.3"), ("register", "10.1.2.3"),
                   ("close", "10.1.2.3"), ("register", "10.1.2.4")]


# ---------------------------------------------------------------- zero-config discovery (issue 11)


def test_auto_browses_private_and_link_local_addresses_only(monkeypatch):
    from edgemoe.coordinator import discovery
    from edgemoe.node import interfaces

    monkeypatch.setattr(interfaces.ifaddr, "get_adapters", lambda: [
        _Adapter("lo", "127.0.0.1", ("::1", 0, 0)),
        _Adapter("eth0", "192.168.1.5", ("fd12::5", 0, 0), ("2001:db8::5", 0, 0), ("fe80::5", 0, 2)),
        _Adapter("wan0", "8.8.4.4"),
        _Adapter("eth1", "172.20.0.3", "172.32.0.3"),  # 172.32/16 is outside 172.16/12
        _Adapter("usb0", "169.254.7.7"),
        _Adapter("vpn0", "10.8.0.2"),
        _Adapter("cgnat0", "100.64.0.9"),  # shared address space: not a LAN of ours
    ])
    assert discovery.browse_targets(None) == [
        ("eth0", "192.168.1.5"), ("eth0", "fd12::5"), ("eth1", "172.20.0.3"), ("usb0", "169.254.7.7"),
        ("vpn0", "10.8.0.2")]
    # Loopback only when asked for, by name or address.
    assert discovery.browse_targets("lo") == [("lo", "127.0.0.1")]
    assert discovery.browse_targets("127.0.0.1") == [("127.0.0.1", "127.0.0.1")]


def test_peers_says_why_it_could_not_look(monkeypatch, tmp_path):
    from edgemoe.coordinator import discovery
    from edgemoe.node import interfaces
    from edgemoe.node.credentials import init_cluster

    with pytest.raises(EdgemoeError, match=f"no cluster token in {tmp_path}.*cluster init") as err:
        discovery.resolve_peers("auto", None, tmp_path, must_look=True)
    assert "--interface" not in str(err.value)
    assert discovery.resolve_peers("auto", None, tmp_path) == ([], None)  # serve/generate: run alone

    init_cluster(tmp_path)
    monkeypatch.setattr(interfaces.ifaddr, "get_adapters", lambda: [_Adapter("lo", "127.0.0.1"),
                                                                    _Adapter("wan0", "8.8.4.4")])
    with pytest.raises(EdgemoeError, match="no private or link-local address; pass --interface"):
        discovery.resolve_peers("auto", None, tmp_path, must_look=True)
    addresses, credentials = discovery.resolve_peers("auto", None, tmp_path)
    assert addresses == [] and credentials is not None


EDGE_NODE = [sys.executable, "-m", "edgemoe.node.daemon"]
CLI = [sys.executable, "-m", "edgemoe.coordinator.cli"]


def _start_node(ns: netns.Namespace, token: str, data: Path, listen: str, interface: str, name: str) -> str:
    proc = netns.run_in(ns, [*EDGE_NODE, "--join", token, "--listen", listen, "--data-dir", str(data),
                             "--interface", interface, "--name", name])
    line = proc.wait_for_line(lambda s: "listening on" in s, 60)
    return line.rsplit(" ", 1)[1]


@pytest.mark.netns
@pytest.mark.slow
def test_peers_auto_finds_lan_nodes_without_interface_and_never_loopback(lan, tmp_path):
    from edgemoe.node.credentials import init_cluster

    a, b, _ = lan.hosts
    token = init_cluster(tmp_path / "cluster").token
    on_lan = _start_node(a, token, tmp_path / "a", f"{a.address}:50061", "eth0", "same-host")
    on_lo = _start_node(b, token, tmp_path / "b", "127.0.0.1:50062", "lo", "same-host")
    peers = [*CLI, "peers", "--json", "--cluster-dir", str(tmp_path / "cluster")]

    def found(*extra: str) -> list[dict]:
        out = b.run([*peers, *extra], timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    wait_until(lambda: found(), timeout=30, what="the LAN node")
    rows = found()
    assert [(r["address"], r["name"], r["healthy"]) for r in rows] == [(on_lan, "same-host", True)]
    rows = found("--interface", "lo")
    assert [(r["address"], r["name"]) for r in rows] == [(on_lo, "same-host")]

    # A namespace with loopback only: `peers` could not look, and says so.
    with netns.Namespace() as alone:
        out = alone.run(peers, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "no private or link-local address" in lines[0], out.stderr


WATCH = """
import argparse, json, signal, sys, threading
from pathlib import Path
from edgemoe.coordinator.commands import _watched_peers
from edgemoe.coordinator.loader import load_streaming_model
cfg = json.loads(sys.argv[1])
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
args = argparse.Namespace(peers="auto", interface=None, cluster_dir=cfg["cluster_dir"])
with _watched_peers(args) as (peers, credentials, watcher):
    sm = load_streaming_model(Path(cfg["model"]), cache_bytes=10_000, peers=peers, credentials=credentials,
                              keep_cluster=watcher is not None)
    watcher.follow(sm.cluster)
    print("LOADED", json.dumps(peers), flush=True)
    last = None
    while not done.wait(0.1):
        now = [[n["address"], n["name"], n["healthy"], n["experts_held"] > 0] for n in sm.cluster.snapshot()["nodes"]]
        if now != last:
            print(json.dumps(now), flush=True)
            last = now
    watcher.follow(None)
    sm.close()
"""


@pytest.mark.netns
@pytest.mark.slow
def test_a_node_that_starts_later_is_used_and_one_that_leaves_is_dropped(lan, models, tmp_path):
    """`serve`, `chat` and `generate` keep browsing (commands._watched_peers) while they run."""
    from edgemoe.node.credentials import init_cluster

    a, b, _ = lan.hosts
    token = init_cluster(tmp_path / "cluster").token
    coordinator = netns.run_in(b, python(WATCH, {"cluster_dir": str(tmp_path / "cluster"),
                                                  "model": str(models.packed("qwen3_moe", True))}))
    assert coordinator.wait_for_line(lambda s: s.startswith("LOADED"), 120) == "LOADED []"

    address = _start_node(a, token, tmp_path / "a", f"{a.address}:50063", "eth0", "late")
    # Joined, healthy, and given experts by the placement: it is used.
    coordinator.wait_for_line(lambda s: s == json.dumps([[address, "late", True, True]]), 30)

    a.procs[-1].popen.terminate()  # withdraws its advertisement
    coordinator.wait_for_line(lambda s: s == "[]", 30)
    assert coordinator.stop(timeout=10) == 0, coordinator.stderr()


def test_instance_name_is_the_node_name_and_id():
    from edgemoe.node.advertise import INSTANCE_MAX, SERVICE_TYPE, instance_name, instance_node_id

    assert instance_name("kitchen mac", "ab12") == "kitchen mac (ab12)"
    long = instance_name("é" * 100, "ab12")
    assert len(long.encode()) <= INSTANCE_MAX and long.endswith("é (ab12)")
    assert instance_name("", "ab12") == "ab12" and instance_name("x", "f" * 63) == "f" * 63
    for name in ("kitchen mac (ab12)", f"kitchen mac (ab12).{SERVICE_TYPE}", "a (b) (ab12)", "ab12"):
        assert instance_node_id(name) == "ab12"


NAMES = """
import json, sys, time
from zeroconf import ServiceBrowser, Zeroconf
from edgemoe.node.advertise import SERVICE_TYPE
zc = Zeroconf(interfaces=[sys.argv[1]])
names = set()
browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[lambda **kw: names.add(kw["name"])])
deadline = time.monotonic() + 20
while len(names) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps(sorted(names)), flush=True)
browser.cancel(); zc.close()
"""


@pytest.mark.netns
def test_mdns_shows_the_node_name_and_same_names_stay_apart(lan):
    a, b, _ = lan.hosts
    ids = sorted([new_id(), new_id()])
    for port, node_id in zip((50071, 50072), ids):
        netns.run_in(a, python(ADVERTISE, {"node_id": node_id, "name": "same-host", "port": port,
                                           "address": a.address, "protocol_version": PROTO, "cluster_id": "c"}))
    for proc in a.procs:
        proc.wait_for_line(lambda s: s == "REGISTERED", TIMEOUT)
    out = b.run([sys.executable, "-c", NAMES, b.address], timeout=60)
    assert json.loads(out.stdout) == [f"same-host ({i})._edgemoe._tcp.local." for i in ids], out.stderr


def test_peers_and_status_show_each_node_by_name_and_address():
    from edgemoe.coordinator.status import format_peer_rows, format_status

    row = {"healthy": True, "name": "same-host", "rtt_ms": 1.0, "experts_held": 3, "cache_used_bytes": 0,
           "cache_free_bytes": 2**20}
    rows = [dict(row, address="10.0.0.1:7070"), dict(row, address="10.0.0.2:7070")]
    lines = format_peer_rows(rows)
    assert [line.split("  ")[0].strip() for line in lines] == ["same-host (10.0.0.1:7070)", "same-host (10.0.0.2:7070)"]
    status = format_status({"coordinator": {"version": "x", "cluster_id": None, "cluster_error": None,
                                             "cluster_dir": "d"}, "last_run": None, "nodes": rows})
    assert all(line in status for line in lines)
