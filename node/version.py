"""Versions a peer must agree on."""

from importlib.metadata import PackageNotFoundError, version

try:
    EDGEMOE_VERSION = version("edgemoe")
except PackageNotFoundError:  # run from a checkout that was never installed
    EDGEMOE_VERSION = "0+unknown"
# The node wire contract (protos/edgemoe_node.proto); bump on any change a peer must know of.
# 2: Info carries each model's held checksums digest and the node's backend (the coordinator checks both).
PROTOCOL_VERSION = 2
