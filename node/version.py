"""Versions a peer must agree on."""

from importlib.metadata import PackageNotFoundError, version

try:
    EDGEMOE_VERSION = version("edgemoe")
except PackageNotFoundError:  # run from a checkout that was never installed
    EDGEMOE_VERSION = "0+unknown"
# The node wire contract (protos/edgemoe_node.proto); bump on any change a peer must know of.
PROTOCOL_VERSION = 1
