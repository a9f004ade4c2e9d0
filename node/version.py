"""Versions a peer must agree on."""

EDGEMOE_VERSION = "0.1.0"
# The node wire contract (protos/edgemoe_node.proto); bump on any change a peer must know of.
PROTOCOL_VERSION = 1
