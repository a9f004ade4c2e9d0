"""`edgemoe doctor`: each check passes on a good setup and fails, in one line, on a broken one; it never writes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from conftest import run_cli
from nodes import NodeProcess, free_port

from edgemoe.node.credentials import TOKEN_FILE, format_token, init_cluster, new_secret
from edgemoe.node.manifest import MANIFEST_NAME, read_manifest


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under `directory`: its mtime and sha256."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def doctor(*args) -> tuple[int, list[str], str]:
    result = run_cli("doctor", *args)
    return result.returncode, result.stdout.splitlines(), result.stderr


def lines_of(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if line.split(None, 1)[-1].startswith(f"{name}: ")]


def test_good_pack_passes_and_nothing_changes(models, tmp_path):
    packed = models.copy_packed(tmp_path / "packed")
    before = snapshot(packed)
    rc, lines, err = doctor("--model", packed, "--peers", "none", "--cluster-dir", tmp_path / "no-cluster")
    assert rc == 0, (lines, err)
    assert all(line.split()[0] in ("ok", "warn") for line in lines), lines
    assert lines_of(lines, "checksums")[0].startswith("ok")
    assert lines_of(lines, "manifest")[0].startswith("ok")
    assert lines_of(lines, "mlx")[0].startswith("ok")
    # no token with --peers none: a warning, not a failure
    assert lines_of(lines, "token")[0].startswith("warn")
    assert snapshot(packed) == before


def test_corrupted_expert_fails_naming_it(models, tmp_path):
    packed = models.copy_packed(tmp_path / "packed")
    manifest = read_manifest(packed)
    spec = manifest.layers[1]
    seg = spec.experts[3].segments[0]
    path = packed / manifest.files[seg.file]
    data = bytearray(path.read_bytes())
    data[seg.offset + seg.length // 2] ^= 0xFF
    path.write_bytes(data)
    before = snapshot(packed)
    rc, lines, err = doctor("--model", packed, "--peers", "none", "--cluster-dir", tmp_path / "no-cluster", "--json")
    assert rc != 0
    checks = {c["name"]: c for c in json.loads(lines[0])}
    assert checks["checksums"]["level"] == "FAIL"
    assert f"layer {spec.layer} expert 3 fail" in checks["checksums"]["detail"]
    assert "expert 2 " not in checks["checksums"]["detail"]  # only the damaged one is named
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(packed) == before


def test_missing_manifest_fails_in_one_line(models, tmp_path):
    packed = models.copy_packed(tmp_path / "packed")
    (packed / MANIFEST_NAME).unlink()
    rc, lines, err = doctor("--model", packed, "--peers", "none", "--cluster-dir", tmp_path / "no-cluster")
    assert rc != 0
    assert lines_of(lines, "manifest")[0].startswith("FAIL") and "edgemoe pack" in lines_of(lines, "manifest")[0]
    assert not lines_of(lines, "checksums")  # nothing to check them against
    assert "Traceback" not in err


def test_expired_token_fails(tmp_path):
    cluster = tmp_path / "cluster"
    cluster.mkdir(mode=0o700)
    token = cluster / TOKEN_FILE
    token.write_text(format_token(new_secret(), int(time.time()) - 60) + "\n")
    os.chmod(token, 0o600)
    rc, lines, _ = doctor("--peers", "none", "--cluster-dir", cluster)
    assert rc != 0
    assert lines_of(lines, "token")[0].startswith("FAIL") and "expired" in lines_of(lines, "token")[0]


def test_unreachable_peer_fails(tmp_path):
    init_cluster(tmp_path / "cluster")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    rc, lines, _ = doctor("--peers", address, "--cluster-dir", tmp_path / "cluster")
    assert rc != 0
    assert lines_of(lines, "token")[0].startswith("ok")
    assert lines_of(lines, f"node {address}")[0].startswith("FAIL")


def test_node_of_this_cluster_passes_and_of_another_fails(tmp_path):
    ours = init_cluster(tmp_path / "cluster")
    theirs = init_cluster(tmp_path / "other")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    good, stranger = NodeProcess(ours.token, tmp_path / "a"), NodeProcess(theirs.token, tmp_path / "b")
    try:
        rc, lines, _ = doctor("--peers", f"{good.address},{stranger.address}", "--cluster-dir", tmp_path / "cluster")
    finally:
        good.stop()
        stranger.stop()
    assert rc != 0
    assert lines_of(lines, f"node {good.address}")[0].startswith("ok")
    assert lines_of(lines, f"node {stranger.address}")[0].startswith("FAIL")
    assert "not of this cluster" in lines_of(lines, f"node {stranger.address}")[0]
    # The node shares this machine's clock: measured, and within the round trip of zero.
    skew = lines_of(lines, "clock skew")[0]
    assert skew.startswith("ok") and good.address in skew
    assert abs(float(skew.split("largest ")[1].split(" s")[0])) < 1.0


def test_clock_skew_judged_per_node():
    from edgemoe.coordinator.doctor import FAIL, OK, WARN, check_clock_skew

    def row(address, skew):
        return {"address": address, "name": "n", "healthy": True, "rtt_ms": 2.0, "clock_skew_s": skew}

    assert check_clock_skew([row("a:1", 0.01)]).level == OK
    near = check_clock_skew([row("a:1", 0.01), row("b:2", -5.0)])
    assert near.level == WARN and "-5.00 s" in near.detail and "b:2" in near.detail and "NTP" in near.detail
    assert check_clock_skew([row("a:1", 400.0)]).level == FAIL
    old = check_clock_skew([row("a:1", None)])
    assert old.level == WARN and "not reported by a:1" in old.detail
