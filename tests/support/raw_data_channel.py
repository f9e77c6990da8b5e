"""Calls on a server's data channel written by hand, frame by frame, so
tests can send what our own client never would."""

from __future__ import annotations

import socket

from ps_common import data_channel
from ps_common.errors import Code
from ps_common.proto import ps_pb2 as pb


def data_call(
    port: int, method: str, bodies: list[bytes], token: str = "", end: bool = True
) -> tuple[Code, str, list[bytes]]:
    """Send `bodies` as one call's messages (then, with `end`, the message
    marked last); the server's status, its details and its answer's bodies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
        for index, body in enumerate(bodies):
            data_channel.write(sock, pb.DataHeader(method=method if index == 0 else "", auth_token=token), body)
        if end:
            data_channel.write(sock, pb.DataHeader(method="" if bodies else method, auth_token=token, last=True))
        return _answer(data_channel.Receiver(stream))


def data_pull(port: int, request: pb.PullRequest) -> tuple[Code, str, list[bytes]]:
    """A Pull: one message, marked last, carrying the request."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
        data_channel.write(sock, pb.DataHeader(method="Pull", last=True), request.SerializeToString())
        return _answer(data_channel.Receiver(stream))


def _answer(receiver: data_channel.Receiver) -> tuple[Code, str, list[bytes]]:
    """The server's answer: its status, details and bodies."""
    answers = []
    while True:
        header, body = receiver.read()
        if header.last:
            return Code(header.code), header.details, answers
        answers.append(bytes(body))
