"""The ways calls reach a server: each transport adapts its bytes to
ParameterService (ps_server.handler) and translates its errors at its edge.

- grpc_server: gRPC, with health and reflection; every client starts here.
- socket_server: the data channel, TCP and a Unix socket, announced in Hello.
"""

from ps_server.transport.grpc_server import GrpcServer
from ps_server.transport.socket_server import SocketServer

__all__ = ["GrpcServer", "SocketServer"]
