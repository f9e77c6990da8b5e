"""Code shared by servers and workers: the generated wire stubs, the tensor
codec, typed errors, the data channel's framing and the flag/environment
config mechanism.

It must not import ps_server or ps_worker.
"""

__all__ = ["PROTOCOL_VERSION"]

# Bumped on any incompatible change to proto/ps.proto; checked at handshake.
PROTOCOL_VERSION = 3
