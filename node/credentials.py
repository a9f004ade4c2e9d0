"""The cluster's trust: one join token from which every device derives the same CA.

The join token is a random 32-byte cluster secret. Every device derives the
cluster CA key from it (HKDF -> ECDSA P-256) and builds the byte-identical
self-signed CA certificate, then signs a fresh leaf key of its own with it.
gRPC runs mutual TLS on top: a peer is a member iff its leaf was signed by the
cluster CA, that is, iff it holds the token. Nothing but the token is stored.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ClusterConfigError, JoinTokenError
from .limits import MAX_MESSAGE_BYTES

TOKEN_VERSION = 1
TOKEN_PREFIX = f"edgemoe{TOKEN_VERSION}-"
SECRET_BYTES = 32
# 4 check bytes catch a mistyped character at parse time instead of as an
# opaque handshake failure; 36 bytes are exactly 48 base64url characters.
_CHECK_BYTES = 4
TOKEN_BODY_CHARS = 48
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

# Every leaf carries this DNS name; clients check it instead of the peer's
# address, which mDNS and static peers give in whatever form.
TARGET_NAME = "edgemoe-node"
SERVER_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.ssl_target_name_override", TARGET_NAME),
    *SERVER_OPTIONS,
)

TOKEN_FILE = "join-token"

# Fixed so that every device builds the same CA certificate. The dates are wide
# on purpose: devices without a real-time clock (or with skewed clocks) must
# still complete the handshake; a cluster is re-keyed by rotating its token.
_NOT_BEFORE = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
_CA_SERIAL = 1
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _check(secret: bytes) -> bytes:
    return hashlib.sha256(b"edgemoe1 join token check" + secret).digest()[:_CHECK_BYTES]


def format_token(secret: bytes, expires: int | None = None) -> str:
    """The join token; `expires` (Unix seconds) makes it stop working then (see `parse_token`)."""
    _require_secret(secret)
    body = base64.urlsafe_b64encode(secret + _check(secret)).decode("ascii")
    return TOKEN_PREFIX + body + (f".{expires:x}" if expires is not None else "")


def _bind_expiry(secret: bytes, expires: int) -> bytes:
    # The cluster's keys come from the secret *and* the expiry: a token whose
    # expiry was cut off or changed derives another CA and is refused at the handshake.
    return _hkdf(secret, b"edgemoe1 expires " + str(expires).encode(), SECRET_BYTES)


def token_expiry(text: str) -> int | None:
    """The Unix time a join token stops working, or None if it does not expire."""
    _, dot, suffix = text.strip().partition(".")
    if not dot:
        return None
    try:
        return int(suffix, 16)
    except ValueError:
        raise JoinTokenError("the expiry at the end of this join token is damaged; copy the whole token") from None


def _preview(text: str) -> str:
    # Never echo a whole (possibly almost right) token into a terminal or a log.
    shown = text[:12] + ("..." if len(text) > 12 else "")
    return f"{shown!r} ({len(text)} characters)"


def parse_token(text: str, now: float | None = None) -> bytes:
    """The cluster secret in a join token; JoinTokenError says what is wrong with a bad one,
    including that it has expired."""
    token, _, _ = text.strip().partition(".")
    expires = token_expiry(text)
    if expires is not None and (time.time() if now is None else now) >= expires:
        when = dt.datetime.fromtimestamp(expires, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        raise JoinTokenError(
            f"this join token expired on {when}; on the coordinator make a new one with "
            "`edgemoe cluster init --rotate` and restart the nodes with it"
        )
    fix = f"copy the whole last line of `edgemoe cluster init` (it starts with {TOKEN_PREFIX!r})"
    head, dash, body = token.partition("-")
    version = re.fullmatch(r"edgemoe(\d+)", head)
    if not dash or not version:
        raise JoinTokenError(f"not an edgemoe join token: {_preview(token)}; {fix}")
    if int(version.group(1)) != TOKEN_VERSION:
        raise JoinTokenError(
            f"join token version {version.group(1)} is not known to this edgemoe (it reads version "
            f"{TOKEN_VERSION}); install the same edgemoe version on every device"
        )
    if len(body) != TOKEN_BODY_CHARS:
        raise JoinTokenError(
            f"not an edgemoe join token: {_preview(token)} has {len(body)} characters after "
            f"{TOKEN_PREFIX!r}, a join token has {TOKEN_BODY_CHARS} (cut short?); {fix}"
        )
    if not _BASE64URL.fullmatch(body):
        raise JoinTokenError(
            f"not an edgemoe join token: {_preview(token)} has characters a join token never has "
            f"(only A-Z a-z 0-9 - _); {fix}"
        )
    try:
        raw = base64.urlsafe_b64decode(body)
    except (binascii.Error, ValueError):
        raise JoinTokenError(f"not an edgemoe join token: {_preview(token)}; {fix}") from None
    secret, check = raw[:SECRET_BYTES], raw[SECRET_BYTES:]
    if not secrets.compare_digest(check, _check(secret)):
        raise JoinTokenError(
            f"not an edgemoe join token: {_preview(token)} fails its checksum (a mistyped or "
            f"changed character); {fix}"
        )
    return secret if expires is None else _bind_expiry(secret, expires)


def _require_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"a cluster secret is {SECRET_BYTES} bytes; use parse_token() on the join token")


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def cluster_id(secret: bytes) -> str:
    """A short public name of the cluster: safe to advertise, tells nothing of the secret."""
    _require_secret(secret)
    return _hkdf(secret, b"edgemoe1 cluster id", 8).hex()


def _ca_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    # 48 bytes reduced mod (n - 1) keep the bias of the scalar below 2**-128.
    wide = int.from_bytes(_hkdf(secret, b"edgemoe1 cluster CA key P-256", 48), "big")
    return ec.derive_private_key(wide % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _ca_name(secret: bytes) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemoe"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgemoe cluster {cluster_id(secret)}"),
        ]
    )


def _ca_cert(secret: bytes, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _ca_name(secret)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_CA_SERIAL)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    # RFC 6979 signatures: the same key and contents give the same bytes everywhere.
    return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)


def _leaf_cert(
    secret: bytes, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey, common_name: str
) -> x509.Certificate:
    cn = common_name.strip()[:64] or TARGET_NAME
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(_ca_name(secret))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # Every device is both a TLS server (edge-node) and a client (coordinator).
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TARGET_NAME)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class ClusterCredentials:
    """PEM bytes for gRPC mutual TLS: the cluster CA and this device's own key and certificate."""

    cluster_id: str
    root_cert: bytes
    private_key: bytes
    cert_chain: bytes

    @classmethod
    def create(cls, secret: bytes, common_name: str) -> ClusterCredentials:
        """The cluster CA derived from `secret`, and a fresh leaf key signed by it (CN = common_name)."""
        _require_secret(secret)
        ca_key = _ca_key(secret)
        ca = _ca_cert(secret, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _leaf_cert(secret, ca_key, key, common_name)
        return cls(
            cluster_id=cluster_id(secret),
            root_cert=ca.public_bytes(serialization.Encoding.PEM),
            private_key=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            cert_chain=leaf.public_bytes(serialization.Encoding.PEM),
        )

    @classmethod
    def from_token(cls, token: str, common_name: str) -> ClusterCredentials:
        return cls.create(parse_token(token), common_name)


def server_credentials(creds: ClusterCredentials) -> grpc.ServerCredentials:
    """TLS that refuses every client without a certificate signed by the cluster CA."""
    return grpc.ssl_server_credentials(
        [(creds.private_key, creds.cert_chain)], root_certificates=creds.root_cert, require_client_auth=True
    )


def channel_credentials(creds: ClusterCredentials) -> grpc.ChannelCredentials:
    """TLS that trusts only servers signed by the cluster CA and proves this device's membership.

    Use with CHANNEL_OPTIONS (it carries the target name every leaf certificate has).
    """
    return grpc.ssl_channel_credentials(
        root_certificates=creds.root_cert, private_key=creds.private_key, certificate_chain=creds.cert_chain
    )


# --- the token file on the coordinator -------------------------------------------------


def default_cluster_dir() -> Path:
    """$EDGEMOE_HOME/cluster, else $XDG_CONFIG_HOME/edgemoe/cluster, else ~/.config/edgemoe/cluster."""
    home = os.environ.get("EDGEMOE_HOME")
    if home:
        return Path(home).expanduser() / "cluster"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "edgemoe" / "cluster"


@dataclass(frozen=True)
class ClusterInit:
    token: str
    cluster_id: str
    path: Path
    replaced_cluster_id: str | None  # the cluster a --rotate re-keyed, else None


def _prepare_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        return
    if not directory.is_dir():
        raise ClusterConfigError(f"{directory} is not a directory; pass --dir a directory for the cluster token")
    mode = stat.S_IMODE(directory.stat().st_mode)
    # Another user who can write the directory could swap the token file.
    if mode & 0o022:
        raise ClusterConfigError(
            f"{directory} can be written by other users (mode {mode:o}); run `chmod 700 {directory}` "
            "or pass --dir a directory only you can write"
        )


def _write_new(path: Path, token: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())


def init_cluster(directory: Path | None = None, *, rotate: bool = False, expires: int | None = None) -> ClusterInit:
    """Make and store a new cluster secret; refuses to replace one unless `rotate`."""
    directory = directory or default_cluster_dir()
    path = directory / TOKEN_FILE
    _prepare_dir(directory)
    old_id = None
    if path.exists() or path.is_symlink():
        if not rotate:
            raise ClusterConfigError(
                f"{path} already holds this cluster's join token (print it with `cat {path}`); "
                "pass --rotate to re-key the cluster (every node must then rejoin with the new token)"
            )
        try:
            old_id = cluster_id(parse_token(path.read_text()))
        except (JoinTokenError, OSError, UnicodeDecodeError):
            old_id = "unreadable"
    token = format_token(new_secret(), expires)
    secret = parse_token(token)
    if old_id is None:
        try:
            _write_new(path, token)
        except FileExistsError:
            raise ClusterConfigError(f"{path} was created meanwhile; run `edgemoe cluster init` once") from None
    else:
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
        try:
            _write_new(tmp, token)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return ClusterInit(token=token, cluster_id=cluster_id(secret), path=path, replaced_cluster_id=old_id)


def load_cluster_secret(directory: Path | None = None) -> bytes:
    """The secret stored by `edgemoe cluster init`; refuses a token file other users can read."""
    directory = directory or default_cluster_dir()
    path = directory / TOKEN_FILE
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise ClusterConfigError(f"no cluster token in {directory}; run `edgemoe cluster init` first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterConfigError(f"cannot read the cluster token {path} ({exc}); check its owner and mode") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ClusterConfigError(
            f"{path} can be read by other users (mode {mode:o}), and the token lets anyone join the cluster; "
            f"run `chmod 600 {path}`, or `edgemoe cluster init --rotate` if others may have read it"
        )
    return parse_token(text)
