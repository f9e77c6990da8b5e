"""Code shared by servers and workers: the generated wire stubs, the tensor
codec, typed errors and the flag/environment config mechanism.

It must not import ps_server or ps_worker.
"""

# Bumped on any incompatible change to proto/ps.proto; checked at handshake.
PROTOCOL_VERSION = 2
