"""Cluster trust: join tokens, the derived CA, and mutual TLS refusing non-members at the handshake.

Servers are real grpc servers on 127.0.0.1 (a free port from the OS) serving the
standard health service; every test stops the servers it started.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgemoe.node.credentials import (
    CHANNEL_OPTIONS,
    SERVER_OPTIONS,
    TARGET_NAME,
    TOKEN_PREFIX,
    ClusterCredentials,
    channel_credentials,
    cluster_id,
    format_token,
    init_cluster,
    load_cluster_secret,
    new_secret,
    parse_token,
    server_credentials,
)
from edgemoe.node.errors import ClusterConfigError, EdgemoeError, JoinTokenError

REPO = Path(__file__).resolve().parent.parent
REFUSAL_DEADLINE_S = 3.0


class CountingHealth(health.HealthServicer):
    """The standard health service, counting the calls that got past the handshake."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def Check(self, request, context):  # noqa: N802 (grpc's name)
        self.calls += 1
        return super().Check(request, context)


@dataclasses.dataclass
class Node:
    port: int
    servicer: CountingHealth

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def secret() -> bytes:
    return new_secret()


@pytest.fixture(scope="module")
def member(secret: bytes) -> ClusterCredentials:
    return ClusterCredentials.create(secret, "coordinator")


@pytest.fixture(scope="module")
def stranger() -> ClusterCredentials:
    return ClusterCredentials.create(new_secret(), "stranger")


def start_node(creds: ClusterCredentials) -> tuple[grpc.Server, Node]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    servicer = CountingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(creds))
    assert port > 0
    server.start()
    return server, Node(port, servicer)


@pytest.fixture
def node(secret: bytes) -> Iterator[Node]:
    server, n = start_node(ClusterCredentials.create(secret, "node-a"))
    try:
        yield n
    finally:
        server.stop(None).wait()


def check(channel: grpc.Channel, timeout: float) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def assert_refused(channel: grpc.Channel, node: Node) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        check(channel, REFUSAL_DEADLINE_S)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    # Refused at the handshake: fast, and the service never saw the call.
    assert time.monotonic() - start < REFUSAL_DEADLINE_S
    assert node.servicer.calls == 0


def secure_channel(node: Node, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(node.address, creds, options=CHANNEL_OPTIONS)


# --- mutual TLS ----------------------------------------------------------------------------


def test_member_is_served(node: Node, member: ClusterCredentials) -> None:
    with secure_channel(node, channel_credentials(member)) as channel:
        assert check(channel, 10) == health_pb2.HealthCheckResponse.SERVING
    assert node.servicer.calls == 1


def test_other_cluster_client_is_refused(node: Node, stranger: ClusterCredentials) -> None:
    with secure_channel(node, channel_credentials(stranger)) as channel:
        assert_refused(channel, node)


def test_foreign_client_certificate_is_refused_by_the_server(
    node: Node, member: ClusterCredentials, stranger: ClusterCredentials
) -> None:
    # Trusts the node's CA, so only the node's check of the client certificate can refuse it.
    impostor = dataclasses.replace(stranger, root_cert=member.root_cert)
    with secure_channel(node, channel_credentials(impostor)) as channel:
        assert_refused(channel, node)


def test_member_refuses_a_node_of_another_cluster(member: ClusterCredentials, stranger: ClusterCredentials) -> None:
    server, foreign = start_node(stranger)
    try:
        with secure_channel(foreign, channel_credentials(member)) as channel:
            assert_refused(channel, foreign)
    finally:
        server.stop(None).wait()


def test_client_without_certificate_is_refused(node: Node, member: ClusterCredentials) -> None:
    with secure_channel(node, grpc.ssl_channel_credentials(root_certificates=member.root_cert)) as channel:
        assert_refused(channel, node)


def test_plaintext_client_is_refused(node: Node) -> None:
    with grpc.insecure_channel(node.address) as channel:
        assert_refused(channel, node)


# --- the derived CA ---------------------------------------------------------------------------


def test_ca_is_byte_identical_from_the_same_token(secret: bytes) -> None:
    a = ClusterCredentials.create(secret, "a")
    b = ClusterCredentials.from_token(format_token(secret), "b")
    assert a.root_cert == b.root_cert
    assert a.cluster_id == b.cluster_id == cluster_id(secret)
    assert a.private_key != b.private_key and a.cert_chain != b.cert_chain
    other = ClusterCredentials.create(new_secret(), "a")
    assert other.root_cert != a.root_cert and other.cluster_id != a.cluster_id


def test_certificates_have_the_fixed_names(member: ClusterCredentials) -> None:
    ca = x509.load_pem_x509_certificate(member.root_cert)
    leaf = x509.load_pem_x509_certificate(member.cert_chain)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.serial_number == 1 and ca.subject == ca.issuer == leaf.issuer
    assert member.cluster_id in ca.subject.rfc4514_string()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TARGET_NAME]
    leaf.verify_directly_issued_by(ca)
    assert ("grpc.ssl_target_name_override", TARGET_NAME) in CHANNEL_OPTIONS


def test_cluster_id_is_short_and_stable(secret: bytes) -> None:
    cid = cluster_id(secret)
    assert cid == cluster_id(secret) and len(cid) == 16 and int(cid, 16) >= 0
    assert cid not in secret.hex()


# --- join tokens ------------------------------------------------------------------------------


def test_token_round_trip(secret: bytes) -> None:
    token = format_token(secret)
    assert token.startswith(TOKEN_PREFIX) and len(token) == len(TOKEN_PREFIX) + 48
    assert parse_token(f"  {token}\n") == secret


def _mistyped(token: str) -> str:
    i = len(TOKEN_PREFIX) + 5
    return token[:i] + ("B" if token[i] != "B" else "C") + token[i + 1 :]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "hello",
        "edgemoe cluster init",
        "edgemoe1-",
        "edgemoe1-abc",
        "edgemoe9-" + "A" * 48,
        "edgemoe1-" + "!" * 48,
        "edgemoe1-" + "A" * 47 + "=",
        "truncated",
        "mistyped",
        "extra",
    ],
)
def test_bad_tokens_are_refused_with_one_line(bad: str, secret: bytes) -> None:
    token = format_token(secret)
    bad = {"truncated": token[:-3], "mistyped": _mistyped(token), "extra": token + "x"}.get(bad, bad)
    with pytest.raises(JoinTokenError) as failed:
        parse_token(bad)
    message = str(failed.value)
    assert isinstance(failed.value, EdgemoeError)
    assert "\n" not in message
    assert "edgemoe cluster init" in message or "edgemoe version" in message
    assert token[len(TOKEN_PREFIX) + 12 :] not in message  # never echoes the token


def test_create_wants_the_secret_not_the_token(secret: bytes) -> None:
    with pytest.raises(ValueError):
        ClusterCredentials.create(format_token(secret).encode(), "x")


# --- the token file and `edgemoe cluster init` ------------------------------------------------


def run_cluster_init(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "edgemoe.coordinator.cli", "cluster", "init", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )


def test_cluster_init_cli(tmp_path: Path) -> None:
    home = tmp_path / "cluster"
    first = run_cluster_init("--dir", str(home))
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip().splitlines()[-1]
    secret = parse_token(token)
    path = home / "join-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert load_cluster_secret(home) == secret
    assert cluster_id(secret) in first.stdout

    again = run_cluster_init("--dir", str(home))
    assert again.returncode != 0
    assert again.stderr.startswith("edgemoe: error: ") and "--rotate" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    assert parse_token(path.read_text()) == secret

    rotated = run_cluster_init("--dir", str(home), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip().splitlines()[-1]
    assert parse_token(new_token) != secret
    assert load_cluster_secret(home) == parse_token(new_token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["join-token"]


def test_default_dir_follows_edgemoe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path / "home"))
    result = init_cluster()
    assert result.path == tmp_path / "home" / "cluster" / "join-token"
    assert load_cluster_secret() == parse_token(result.token)


def test_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    result = init_cluster(tmp_path / "c")
    os.chmod(result.path, 0o644)
    with pytest.raises(ClusterConfigError, match="chmod 600"):
        load_cluster_secret(tmp_path / "c")


def test_missing_token_file_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="edgemoe cluster init"):
        load_cluster_secret(tmp_path / "nothing")


def test_world_writable_dir_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ClusterConfigError, match="other users"):
        init_cluster(shared)
    assert not (shared / "join-token").exists()


def test_expired_token_is_refused_with_one_line_and_a_cut_expiry_is_another_cluster(tmp_path):
    from edgemoe.node.credentials import cluster_id, format_token, new_secret

    secret = new_secret()
    expired = format_token(secret, int(time.time()) - 60)
    with pytest.raises(JoinTokenError, match="expired"):
        parse_token(expired)
    valid = format_token(secret, int(time.time()) + 3600)
    assert cluster_id(parse_token(valid)) != cluster_id(parse_token(valid.partition(".")[0]))
    out = subprocess.run([sys.executable, "-m", "edgemoe.node.daemon", "--join", expired, "--listen", "127.0.0.1:0",
                          "--data-dir", str(tmp_path / "n"), "--no-advertise"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("edge-node: error:") and "expired" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cluster_init_with_expiry_gives_an_expiring_token(tmp_path):
    from edgemoe.node.credentials import token_expiry

    out = subprocess.run([sys.executable, "-m", "edgemoe.coordinator.cli", "cluster", "init",
                          "--dir", str(tmp_path / "c"), "--expires-days", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    assert token_expiry(token) is not None
    parse_token(token)


def test_a_running_node_leaves_the_cluster_when_its_join_token_expires(tmp_path):
    from nodes import NodeProcess

    # Far enough ahead for the node to start on a busy machine; it then runs until the expiry.
    token = format_token(new_secret(), int(time.time()) + 10)
    node = NodeProcess(token, tmp_path / "node")
    try:
        assert node.proc.wait(timeout=60) == 0
    finally:
        node.stop()
    assert "join token expired: leaving the cluster" in node.proc.stderr.read()
