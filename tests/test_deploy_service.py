"""`edgemoe install-service node`: the systemd unit and the launchd agent it writes, and the 0600 env file."""

from __future__ import annotations

import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.coordinator import deploy
from edgemoe.coordinator.cli import main
from edgemoe.node.credentials import init_cluster

EDGE_NODE = str(Path(sys.executable).parent / "edge-node")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return init_cluster(tmp_path / "cluster").path


def install(tmp_path: Path, token_file: Path, *extra: str) -> Path:
    out = tmp_path / "out"
    rc = main(["install-service", "node", "--token-file", str(token_file), "--output", str(out),
               "--interface", "eth0", "--cache-mb", "2048", *extra])
    assert rc == 0
    return out


def token_of(token_file: Path) -> str:
    return token_file.read_text().strip().splitlines()[-1]


def test_systemd_unit_runs_the_real_edge_node_with_the_token_in_a_0600_env_file(tmp_path, token_file, capsys):
    out = install(tmp_path, token_file, "--platform", "linux")
    unit = (out / "edge-node.service").read_text()
    env = out / "node.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert env.read_text() == f"EDGEMOE_JOIN_TOKEN={token_of(token_file)}\n"
    lines = unit.splitlines()
    assert f"EnvironmentFile={env}" in lines
    exec_line = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_line.split("=", 1)[1].split() == [EDGE_NODE, "--listen", "0.0.0.0:7070", "--interface", "eth0",
                                                 "--cache-mb", "2048", "--data-dir", "/var/lib/edgemoe-node"]
    assert token_of(token_file) not in unit
    assert "StateDirectory=edgemoe-node" in lines and "WantedBy=multi-user.target" in lines
    assert token_of(token_file) not in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes_on_the_unit(tmp_path, token_file):
    out = install(tmp_path, token_file, "--platform", "linux")
    done = subprocess.run(["systemd-analyze", "verify", str(out / "edge-node.service")], capture_output=True,
                          text=True, timeout=60)
    # Unknown keys are only warned about, with exit 0: no output at all is the pass.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_launchd_plist_reads_the_token_from_the_env_file(tmp_path, token_file):
    out = install(tmp_path, token_file, "--platform", "macos")
    raw = (out / f"{deploy.LABEL}.plist").read_bytes()
    plist = plistlib.loads(raw)
    env = out / "node.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert token_of(token_file).encode() not in raw
    assert plist["Label"] == deploy.LABEL
    assert plist["EnvironmentVariables"]["PATH"].startswith("/opt/homebrew/bin:")
    argv = plist["ProgramArguments"]
    assert argv[:4] == ["/bin/sh", "-c", deploy.SOURCE_AND_EXEC, str(env)]
    assert argv[4:] == [EDGE_NODE, "--listen", "0.0.0.0:7070", "--interface", "eth0", "--cache-mb", "2048"]
    # What launchd runs: the sh line sources the env file and execs edge-node with the token in its environment.
    done = subprocess.run(argv[:4] + ["/usr/bin/env"], capture_output=True, text=True, env={"PATH": "/usr/bin"},
                          timeout=30)
    assert f"EDGEMOE_JOIN_TOKEN={token_of(token_file)}" in done.stdout.splitlines()


def test_dry_run_writes_nothing_and_shows_no_token(tmp_path, token_file, capsys):
    out = tmp_path / "out"
    assert main(["install-service", "node", "--token-file", str(token_file), "--output", str(out), "--dry-run",
                 "--platform", "linux"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"ExecStart={EDGE_NODE} " in printed
    assert token_of(token_file) not in printed


def test_an_existing_env_file_is_made_0600(tmp_path, token_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "node.env").write_text("old\n")
    (out / "node.env").chmod(0o644)
    install(tmp_path, token_file, "--platform", "linux")
    assert stat.S_IMODE((out / "node.env").stat().st_mode) == 0o600


@pytest.mark.parametrize("content, wanted", [(None, "cannot read the join token"), ("", "holds no join token"),
                                             ("edgemoe1-nonsense\n", "join token")])
def test_a_missing_or_bad_token_is_a_one_line_error(tmp_path, capsys, content, wanted):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    rc = main(["install-service", "node", "--token-file", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and wanted in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def keys(unit: str) -> set[str]:
    return {line.split("=", 1)[0] for line in unit.splitlines() if "=" in line and not line.startswith("#")}


def test_the_deploy_examples_match_what_the_command_writes(tmp_path, token_file):
    repo = Path(__file__).resolve().parent.parent
    linux = install(tmp_path / "linux", token_file, "--platform", "linux", "--user", "nobody")
    assert keys((repo / "deploy" / "edge-node.service").read_text()) == keys((linux / "edge-node.service").read_text())
    macos = install(tmp_path / "macos", token_file, "--platform", "macos")
    example = plistlib.loads((repo / "deploy" / f"{deploy.LABEL}.plist").read_bytes())
    written = plistlib.loads((macos / f"{deploy.LABEL}.plist").read_bytes())
    assert set(example) == set(written) and example["ProgramArguments"][:3] == written["ProgramArguments"][:3]
