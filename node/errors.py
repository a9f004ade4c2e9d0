"""Errors a user can cause and fix; the CLIs turn each into a one-line message."""


class EdgemoeError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ManifestError(EdgemoeError):
    """The packed model's manifest is missing, unreadable or of another format."""


class ExpertFileError(EdgemoeError):
    """An expert file is missing or shorter than the manifest says."""


class ChecksumError(EdgemoeError):
    """An expert's bytes do not match the checksum in the manifest."""


class CacheBudgetError(EdgemoeError):
    """The cache budget cannot hold even one expert."""


class SourceModelError(EdgemoeError):
    """The model to pack is not an mlx-lm MoE model directory."""


class UnsupportedArchitectureError(EdgemoeError):
    """mlx-lm has no architecture of that name, or it has no routed experts."""


class DuplicateNodeError(EdgemoeError):
    """Another node on the network already advertises this node id."""


class PeerAddressError(EdgemoeError):
    """A static peer address (`--peers HOST:PORT,...`) is malformed."""


class JoinTokenError(EdgemoeError):
    """A join token is malformed, truncated, mistyped or of an unknown version."""


class ClusterConfigError(EdgemoeError):
    """The cluster's config dir is missing its token, already has one, or is open to other users."""
