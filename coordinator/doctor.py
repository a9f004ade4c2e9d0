"""`edgemoe doctor`: a read-only readiness check, one line per check.

Nothing here writes: the pack's files are opened read-only, the token is only read,
the nodes are only asked for their Info.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from edgemoe.node.errors import EdgemoeError
from edgemoe.node.limits import DISK_RESERVE_BYTES, ram_bytes

OK, WARN, FAIL = "ok", "warn", "FAIL"
# A token this close to its expiry is worth a warning: nodes stop joining then.
EXPIRY_WARN_S = 7 * 86400
# A few seconds off is harmless; minutes off moves token expiry and certificate validity.
CLOCK_SKEW_WARN_S = 2.0
CLOCK_SKEW_FAIL_S = 300.0
# The dense part is read from this file and kept in array memory whole.
DENSE_FILE = "dense.safetensors"


@dataclass(frozen=True)
class Check:
    level: str  # ok, warn or FAIL
    name: str
    detail: str  # what was found and, when not ok, what to do

    def line(self) -> str:
        return f"{self.level:<4}  {self.name}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def check_model(model: Path, progress: bool = False) -> list[Check]:
    """The manifest, then every expert record read once and compared with its checksum."""
    from edgemoe.node.errors import ChecksumError
    from edgemoe.node.manifest import read_manifest
    from edgemoe.node.store import ExpertStore

    from .progress import progress_bar

    try:
        manifest = read_manifest(model)
    except EdgemoeError as exc:
        return [Check(FAIL, "manifest", str(exc))]
    experts = sum(spec.num_experts for spec in manifest.layers)
    checks = [Check(OK, "manifest", f"{model}: {len(manifest.layers)} MoE layers, {experts} experts, "
                    f"{_mib(manifest.total_expert_bytes)} of experts")]
    bad: list[str] = []
    try:
        # ExpertStore verifies a record's sha256 on its first read: one read per expert verifies them all.
        with ExpertStore(model, manifest) as store, \
                progress_bar(manifest.total_expert_bytes, "checking expert checksums", always=progress) as bar:
            for spec in manifest.layers:
                for expert in range(spec.num_experts):
                    try:
                        store.read(spec.layer, expert)
                    except ChecksumError:
                        bad.append(f"layer {spec.layer} expert {expert}")
                    bar.update(spec.record_bytes)
    except EdgemoeError as exc:  # a missing, truncated or unreadable expert file
        return checks + [Check(FAIL, "checksums", str(exc))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        checks.append(Check(FAIL, "checksums", f"{shown} fail their checksum: the pack is corrupted; repack the "
                            "model (`edgemoe pack SRC DST --force`)"))
    else:
        checks.append(Check(OK, "checksums", f"all {experts} experts match the manifest"))
    return checks


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (EDGEMOE_HOME may not be made yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(paths: dict[str, Path]) -> list[Check]:
    """Free space on each file system named, one line per file system."""
    by_device: dict[int, tuple[list[str], Path]] = {}
    for what, path in paths.items():
        where = _existing(path.expanduser())
        by_device.setdefault(os.stat(where).st_dev, ([], where))[0].append(what)
    checks = []
    for names, where in by_device.values():
        st = os.statvfs(where)
        free, name = st.f_bavail * st.f_frsize, f"disk ({', '.join(names)})"
        if free < DISK_RESERVE_BYTES:
            checks.append(Check(FAIL, name, f"{_mib(free)} free on {where}'s file system, under "
                                f"{_mib(DISK_RESERVE_BYTES)}: free some space there"))
        else:
            checks.append(Check(OK, name, f"{_mib(free)} free on {where}'s file system"))
    return checks


def check_mlx() -> Check:
    """The MLX backend in use."""
    from edgemoe.node.limits import compute_backend, mlx_backend_missing

    try:
        import mlx.core as mx

        device = mx.default_device()
    except ImportError as exc:
        return Check(FAIL, "mlx", mlx_backend_missing(exc) or f"mlx cannot be imported ({exc}); reinstall edgemoe")
    return Check(OK, "mlx", f"mlx {version('mlx')}, default device {device}, computing on {compute_backend()}")


def check_memory(model: Path | None, mlx_ok: bool) -> Check:
    """RAM and the memory MLX's arrays live in; the dense part must fit there."""
    from edgemoe.node.limits import array_memory_bytes, array_memory_kind

    ram = ram_bytes()
    if not mlx_ok:
        return Check(WARN, "memory", f"RAM {_mib(ram)}; array memory unknown without MLX (see the mlx line)")
    arrays, kind = array_memory_bytes(), array_memory_kind()
    detail = f"RAM {_mib(ram)}, array memory {_mib(arrays)} ({kind})"
    dense = model / DENSE_FILE if model is not None else None
    if dense is not None and dense.is_file():
        size = dense.stat().st_size
        if size > arrays:
            return Check(FAIL, "memory", f"{detail}: the dense part ({_mib(size)}) does not fit; use a machine with "
                         "more memory or a more quantized model")
        detail += f", dense part {_mib(size)}"
    return Check(OK, "memory", detail)


def check_token(cluster_dir: Path, peers: str) -> Check:
    """The join token: present, private, well-formed and not expired."""
    from edgemoe.node.credentials import TOKEN_FILE, cluster_id, load_cluster_secret, token_expiry

    path = cluster_dir / TOKEN_FILE
    if not path.exists():
        level = FAIL if peers not in ("none", "auto") else WARN
        return Check(level, "token", f"no cluster token in {cluster_dir}: running on this machine alone; "
                     "`edgemoe cluster init` makes one to use edge nodes")
    try:
        secret = load_cluster_secret(cluster_dir)  # refuses an expired, damaged or readable-by-others token
        expires = token_expiry(path.read_text())
    except (EdgemoeError, OSError) as exc:
        return Check(FAIL, "token", f"{path}: {exc}")
    detail = f"cluster {cluster_id(secret)} ({path})"
    if expires is None:
        return Check(OK, "token", f"{detail}, does not expire")
    when = dt.datetime.fromtimestamp(expires, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if expires - time.time() < EXPIRY_WARN_S:
        return Check(WARN, "token", f"{detail} expires on {when}, within a week: make a new one with "
                     "`edgemoe cluster init --rotate` and restart the nodes with it")
    return Check(OK, "token", f"{detail}, expires on {when}")


def check_nodes(peers: str, interface: str | None, cluster_dir: Path) -> list[Check]:
    """Each node reachable over the cluster's mutual TLS (so of this cluster), then the clock line."""
    from .discovery import resolve_peers
    from .status import probe_peers

    try:
        addresses, credentials = resolve_peers(peers, interface, cluster_dir)
    except EdgemoeError as exc:
        return [Check(FAIL, "nodes", str(exc))]
    if not addresses:
        level, why = (OK, "none asked for (--peers none)") if peers == "none" else (
            WARN, "none found: start `edge-node --join TOKEN` on other devices and pass --peers HOST:PORT or "
            "--interface ADDR")
        return [Check(level, "nodes", why), Check(OK, "clock skew", "no nodes to compare with")]
    checks = []
    rows = probe_peers(addresses, credentials)
    for row in rows:
        if row["healthy"]:
            checks.append(Check(OK, f"node {row['address']}", f"{row['name']}, of this cluster (its certificate "
                                f"is the cluster's), round trip {row['rtt_ms']:.1f} ms, {row['experts_held']} "
                                "experts held"))
        else:
            checks.append(Check(FAIL, f"node {row['address']}", row["error"]))  # it says what to do
    checks.append(check_clock_skew(rows))
    return checks


def check_clock_skew(rows: list[dict]) -> Check:
    """The largest clock difference to a node (each node's clock against the midpoint of this
    machine's around its answer). Token expiry and certificate validity are judged by each
    device's own clock, so a device far off refuses or is refused."""
    skews = [(abs(r["clock_skew_s"]), r) for r in rows if r["healthy"] and r.get("clock_skew_s") is not None]
    silent = [r["address"] for r in rows if r["healthy"] and r.get("clock_skew_s") is None]
    if not skews:
        return Check(WARN if silent else OK, "clock skew", f"not reported by {', '.join(silent)} (an older "
                     "edge-node): keep every device on NTP" if silent else "no healthy node to compare with")
    worst, row = max(skews, key=lambda s: s[0])
    detail = (f"largest {row['clock_skew_s']:+.2f} s ({row['name']} ({row['address']}), ± "
              f"{row['rtt_ms'] / 2000:.3f} s)")
    if worst > CLOCK_SKEW_FAIL_S:
        return Check(FAIL, "clock skew", f"{detail}: tokens and certificates are judged by each device's clock; "
                     "turn on NTP (network time) on that device")
    if worst > CLOCK_SKEW_WARN_S:
        return Check(WARN, "clock skew", f"{detail}: turn on NTP (network time) on that device")
    return Check(OK, "clock skew", detail)


def run_doctor(model: Path | None, peers: str, interface: str | None, cluster_dir: Path,
               progress: bool = False) -> list[Check]:
    """Every check, in the order a user fixes things in."""
    from .status import edgemoe_home

    checks = check_model(model, progress) if model is not None else []
    disks = {"model": model} if model is not None else {}
    checks += check_disk({**disks, "EDGEMOE_HOME": edgemoe_home()})
    mlx = check_mlx()
    checks += [mlx, check_memory(model, mlx.level == OK), check_token(cluster_dir, peers)]
    checks += check_nodes(peers, interface, cluster_dir)
    return checks
