"""`edgemoe install-service node`: a systemd unit (Linux) or a launchd agent (macOS) that runs
`edge-node` at boot, with the join token in an env file only its owner can read."""

from __future__ import annotations

import os
import plistlib
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from edgemoe.node.credentials import TOKEN_FILE, default_cluster_dir, parse_token
from edgemoe.node.errors import EdgemoeError

LABEL = "com.edgemoe.edge-node"
UNIT = "edge-node.service"
PLIST = f"{LABEL}.plist"
ENV_FILE = "node.env"
# Where systemd keeps the node's data (StateDirectory= makes it, owned by the service's user).
STATE_DIR = "/var/lib/edgemoe-node"
# Apple Silicon's Homebrew prefix first: launchd starts agents with a bare PATH.
MACOS_PATH = "/opt/homebrew/bin:/opt/homebrew/sbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
# Reads the env file into the environment, then runs edge-node: the token never shows in the plist or `ps`.
SOURCE_AND_EXEC = 'set -a; . "$0"; set +a; exec "$@"'


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    text: str
    mode: int
    secret: bool = False  # holds the token: never printed


@dataclass(frozen=True)
class NodeService:
    files: list[ServiceFile]
    next_steps: list[str]


def find_edge_node(given: str | None = None) -> str:
    """The edge-node of this installation (next to the running Python), else the one on PATH."""
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EdgemoeError(f"--edge-node {given}: no executable there")
        return str(path.absolute())
    sibling = Path(sys.executable).parent / "edge-node"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling.absolute())
    found = shutil.which("edge-node")
    if found:
        return str(Path(found).absolute())
    raise EdgemoeError("cannot find the edge-node command: install edgemoe (see the README) or pass --edge-node PATH")


def read_token(token_file: str | None) -> tuple[str, str]:
    """The join token and where it came from: --token-file, $EDGEMOE_JOIN_TOKEN, or the cluster's token file."""
    if token_file is None and os.environ.get("EDGEMOE_JOIN_TOKEN"):
        token, source = os.environ["EDGEMOE_JOIN_TOKEN"].strip(), "$EDGEMOE_JOIN_TOKEN"
    else:
        path = Path(token_file).expanduser() if token_file else default_cluster_dir() / TOKEN_FILE
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise EdgemoeError(f"cannot read the join token from {path}: {exc.strerror}; put the last line of "
                               "`edgemoe cluster init` in a file and pass --token-file FILE") from None
        if not lines:
            raise EdgemoeError(f"{path} holds no join token; put the last line of `edgemoe cluster init` in it")
        token, source = lines[-1], str(path)
    parse_token(token)  # a bad or expired token is refused now, not at every restart of the service
    return token, source


def node_args(listen: str, interface: str | None, cache_mb: float | None, name: str | None,
              data_dir: str | None) -> list[str]:
    args = ["--listen", listen]
    if interface:
        args += ["--interface", interface]
    if cache_mb is not None:
        args += ["--cache-mb", f"{cache_mb:g}"]
    if name:
        args += ["--name", name]
    if data_dir:
        args += ["--data-dir", data_dir]
    return args


def env_text(token: str) -> str:
    # A token is base64url with '-', '.' and '=': a plain value to both systemd and sh.
    return f"EDGEMOE_JOIN_TOKEN={token}\n"


def service_user(edge_node: str, user: str | None) -> str | None:
    """The user the systemd service runs as: --user, else the owner of edge-node (a venv in a home directory
    that only its owner can enter), else None for a DynamicUser."""
    if user:
        return user
    uid = Path(edge_node).stat().st_uid
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def systemd_unit(edge_node: str, args: list[str], env_file: Path, user: str | None) -> str:
    who = f"User={user}" if user else "DynamicUser=yes"
    command = shlex.join([edge_node, *args])
    return f"""# Written by `edgemoe install-service node`. The join token is in {env_file} (mode 0600).
[Unit]
Description=edgemoe edge node (serves MoE experts to the cluster's coordinator)
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile={env_file}
ExecStart={command}
{who}
StateDirectory=edgemoe-node
StateDirectoryMode=0700
NoNewPrivileges=yes
PrivateTmp=yes
Restart=on-failure
RestartSec=5
# edge-node withdraws its mDNS advertisement on SIGTERM.
KillSignal=SIGTERM
TimeoutStopSec=10

[Install]
WantedBy=multi-user.target
"""


def launchd_plist(edge_node: str, args: list[str], env_file: Path, log: Path) -> str:
    plist = {
        "Label": LABEL,
        "ProgramArguments": ["/bin/sh", "-c", SOURCE_AND_EXEC, str(env_file), edge_node, *args],
        "EnvironmentVariables": {"PATH": MACOS_PATH},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
    }
    return plistlib.dumps(plist).decode()


def plan(platform: str, edge_node: str, args: list[str], token: str, output: Path | None,
         user: str | None) -> NodeService:
    """The files to write and what to run after, for `platform` ("linux" or "macos")."""
    if platform == "linux":
        unit = (output or Path("/etc/systemd/system")) / UNIT
        env = (output or Path("/etc/edgemoe")) / ENV_FILE
        if "--data-dir" not in args:
            args = [*args, "--data-dir", STATE_DIR]
        text = systemd_unit(edge_node, args, env.absolute(), service_user(edge_node, user))
        steps = ([f"sudo systemctl enable --now {unit.absolute()}"] if output
                 else ["sudo systemctl daemon-reload", "sudo systemctl enable --now edge-node"])
        steps += ["journalctl -u edge-node -f    (its log)", "sudo systemctl disable --now edge-node    (to remove)"]
        return NodeService([ServiceFile(unit.absolute(), text, 0o644),
                            ServiceFile(env.absolute(), env_text(token), 0o600, secret=True)], steps)
    home = Path.home()
    agents = home / "Library" / "LaunchAgents"
    plist = (output or agents) / PLIST
    env = (output or default_cluster_dir().parent) / ENV_FILE
    log = home / "Library" / "Logs" / "edgemoe-node.log"
    text = launchd_plist(edge_node, args, env.absolute(), log)
    steps = [] if output is None else [f"cp {plist.absolute()} {agents}/"]
    steps += [f"launchctl bootstrap gui/$(id -u) {agents / PLIST}",
              f"tail -f {log}    (its log)",
              f"launchctl bootout gui/$(id -u)/{LABEL}    (to remove)"]
    return NodeService([ServiceFile(plist.absolute(), text, 0o644),
                        ServiceFile(env.absolute(), env_text(token), 0o600, secret=True)], steps)


def write(service: NodeService) -> None:
    """Writes the files; the env file is made 0600 before the token goes in."""
    for f in service.files:
        try:
            if f.secret and not f.path.parent.exists():
                f.path.parent.mkdir(mode=0o700, parents=True)
            f.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f.mode)
            with os.fdopen(fd, "w") as out:
                os.fchmod(out.fileno(), f.mode)  # an existing file keeps its mode through O_CREAT
                out.write(f.text)
        except OSError as exc:
            raise EdgemoeError(f"cannot write {f.path}: {exc.strerror}; run it with sudo, or pass --output DIR "
                               "and install the files from there") from None


def show(service: NodeService, source: str, dry_run: bool) -> str:
    """What the command prints: the files (the token left out), then the commands to run."""
    out = []
    for f in service.files:
        if dry_run:
            text = f"EDGEMOE_JOIN_TOKEN=<the token from {source}>\n" if f.secret else f.text
            out.append(f"--- {f.path} (mode {f.mode:04o})\n{text}")
        else:
            out.append(f"wrote {f.path} (mode {f.mode:04o})" + (f", the join token from {source}" if f.secret else ""))
    out.append("would write the files above; then run:" if dry_run else "now run:")
    out += [f"  {step}" for step in service.next_steps]
    return "\n".join(out)


def current_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"
