"""The client side of the Foxglove WebSocket protocol (``foxglove.sdk.v1``) for the tests: a real
``websockets`` client that reads the advertised channels, subscribes and decodes messageData."""

from __future__ import annotations

import base64
import json
import struct
import time
from contextlib import ExitStack

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from websockets.sync.client import ClientConnection, connect

from runtime.web.foxglove import TOPICS

SUBPROTOCOL = "foxglove.sdk.v1"
DEADLINE_S = 5.0
MESSAGE_DATA = 0x01
HEADER = struct.Struct("<BIQ")  # opcode, subscription id, log time (ns)


class Viewer:
    """The client side of the Foxglove WebSocket protocol, as much as these tests need."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server_info: dict | None = None
        self.channels: dict[str, dict] = {}  # topic -> advertised channel
        self._stack = ExitStack()

    def __enter__(self) -> Viewer:
        """Connect, then read serverInfo and the advertised channels."""
        url = f"ws://127.0.0.1:{self.port}"
        self.ws: ClientConnection = self._stack.enter_context(
            connect(url, subprotocols=[SUBPROTOCOL], open_timeout=DEADLINE_S)
        )
        deadline = time.monotonic() + DEADLINE_S
        while (self.server_info is None or set(self.channels) < set(TOPICS)) and time.monotonic() < deadline:
            try:
                frame = self.ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            assert isinstance(frame, str), "control messages are JSON text"
            op = json.loads(frame)
            if op["op"] == "serverInfo":
                self.server_info = op
            elif op["op"] == "advertise":
                self.channels.update({c["topic"]: c for c in op["channels"]})
        return self

    def subscribe(self, topics: list[str]) -> dict[int, str]:
        """Subscribe to ``topics``; returns subscription id -> topic."""
        subs = {i + 1: topic for i, topic in enumerate(topics)}
        request = [{"id": i, "channelId": self.channels[t]["id"]} for i, t in subs.items()]
        self.ws.send(json.dumps({"op": "subscribe", "subscriptions": request}))
        return subs

    def poll(self, subs: dict[int, str], got: dict[str, tuple[int, bytes]], timeout: float) -> None:
        """Read messageData frames for ``timeout`` into ``got`` (topic -> (log time, payload))."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                frame = self.ws.recv(timeout=left)
            except TimeoutError:
                return
            if isinstance(frame, bytes) and frame[0] == MESSAGE_DATA:
                _, sub_id, log_time = HEADER.unpack_from(frame)
                got[subs[sub_id]] = (log_time, frame[HEADER.size :])

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def protobuf_class(channel: dict):
    """The message class of an advertised protobuf channel, built from its FileDescriptorSet."""
    assert channel["schemaEncoding"] == "protobuf"
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"]))
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"]))
