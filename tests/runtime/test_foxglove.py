"""The live Foxglove stream, seen by a real viewer: a ``websockets`` client speaking the Foxglove
WebSocket protocol (``foxglove.sdk.v1``) against ``FoxgloveLive`` on 127.0.0.1, no mocks.

Subscriptions take effect asynchronously in the server, so the publishing side loops until the
viewer has what it asked for, bounded by a deadline.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import time

import cv2
import numpy as np
import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

from runtime.web.foxglove import TOPICS, FoxgloveLive
from tests.runtime.foxglove_viewer import (
    DEADLINE_S,
    SUBPROTOCOL,
    Viewer,
    protobuf_class,
)


def jpeg_image(height: int = 24, width: int = 40) -> bytes:
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2] = (0, 0, 255)
    img[height // 2 :, :] = (255, 128, 0)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_viewer_receives_camera_prediction_health_and_latency():
    stamp_ns = 1_712_345_678_123_456_789
    jpeg = jpeg_image()
    prediction = {
        "label": "mug",
        "class_id": 3,
        "confidence": np.float32(0.8125),  # numpy scalars come straight from the model
        "topk": [["mug", 0.8125], ["cup", 0.125]],
        "known": True,
        "novelty": float("nan"),  # not JSON: must become null
        "unknown": False,
        "smoothed_label": "mug",
        "smoothed_confidence": 0.75,
        "stamp_ns": stamp_ns,
        "latency_ms": 12.5,
        "latency_from": "image",
        "age_ms": {"image": 3.5, "audio": None},
        "present": {"image": True, "audio": False},
        "model_version": 7,
        "seq": np.int64(42),
        "extra": {"note": "passes through"},
        "handle": object(),  # no JSON form: dropped, not a crash
    }
    sensors = {"image": {"healthy": True, "age_s": 0.01, "messages": 120}, "imu": {"healthy": False}}

    with FoxgloveLive(port=0) as live:
        assert live.port > 0
        with Viewer(live.port) as viewer:
            assert viewer.server_info is not None and viewer.server_info["name"] == "continua"
            assert set(viewer.channels) == set(TOPICS)
            subs = viewer.subscribe(list(TOPICS))
            got: dict[str, tuple[int, bytes]] = {}
            deadline = time.monotonic() + DEADLINE_S
            while set(got) < set(TOPICS) and time.monotonic() < deadline:
                live.camera(jpeg, stamp_ns, frame_id="cam0")
                live.prediction(prediction)
                live.health(sensors, stamp_ns)
                live.latency(12.5, stamp_ns, p99_ms=30.0)
                viewer.poll(subs, got, 0.05)
    assert set(got) == set(TOPICS), f"received only {sorted(got)}"

    # /camera: a protobuf foxglove.CompressedImage, decoded with the schema the server advertised.
    cam = viewer.channels["/camera"]
    assert cam["schemaName"] == "foxglove.CompressedImage" and cam["encoding"] == "protobuf"
    log_time, payload = got["/camera"]
    assert log_time == stamp_ns
    image = protobuf_class(cam).FromString(payload)
    assert image.format == "jpeg"
    assert image.frame_id == "cam0"
    assert image.data == jpeg
    assert image.timestamp.seconds * 1_000_000_000 + image.timestamp.nanos == stamp_ns
    decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (24, 40, 3)

    # /prediction: JSON with a JSON Schema naming its fields.
    pred_ch = viewer.channels["/prediction"]
    assert pred_ch["encoding"] == "json" and pred_ch["schemaEncoding"] == "jsonschema"
    schema = json.loads(pred_ch["schema"])
    assert schema["type"] == "object"
    assert {"timestamp", "label", "confidence", "topk", "stamp_ns", "age_ms"} <= set(schema["properties"])
    log_time, payload = got["/prediction"]
    assert log_time == stamp_ns
    body = json.loads(payload)
    assert body["label"] == "mug"
    assert math.isclose(body["confidence"], 0.8125, rel_tol=1e-6)
    assert body["topk"] == [["mug", 0.8125], ["cup", 0.125]]
    assert body["stamp_ns"] == stamp_ns
    assert body["timestamp"] == {"sec": 1_712_345_678, "nsec": 123_456_789}
    assert body["novelty"] is None
    assert body["seq"] == 42
    assert body["age_ms"] == {"image": 3.5, "audio": None}
    assert body["extra"] == {"note": "passes through"}
    assert "handle" not in body

    # /health and /latency: JSON, timestamped, plottable.
    log_time, payload = got["/health"]
    health = json.loads(payload)
    assert log_time == stamp_ns
    assert health["sensors"] == sensors
    assert health["healthy"] is False  # the imu is not
    assert "sensors" in json.loads(viewer.channels["/health"]["schema"])["properties"]
    log_time, payload = got["/latency"]
    latency = json.loads(payload)
    assert latency == {"timestamp": {"sec": 1_712_345_678, "nsec": 123_456_789}, "latency_ms": 12.5, "p99_ms": 30.0}
    assert set(json.loads(viewer.channels["/latency"]["schema"])["properties"]) == {
        "timestamp",
        "latency_ms",
        "p99_ms",
    }


def test_two_instances_in_one_process_share_no_channels():
    with FoxgloveLive(port=0, name="left") as left, FoxgloveLive(port=0, name="right") as right:
        assert left.port != right.port
        with Viewer(left.port) as lv, Viewer(right.port) as rv:
            viewers = [lv, rv]
            names = [v.server_info["name"] if v.server_info else None for v in viewers]
            assert names == ["left", "right"]
            ids = []
            for v in viewers:
                assert sorted(v.channels) == sorted(TOPICS)  # four each, not eight
                ids.append({c["id"] for c in v.channels.values()})
            assert len(ids[0]) == len(ids[1]) == len(TOPICS)
            assert not ids[0] & ids[1]

            # A prediction published on the left reaches the left viewer only.
            subs = [v.subscribe(["/prediction"]) for v in viewers]
            got: list[dict[str, tuple[int, bytes]]] = [{}, {}]
            deadline = time.monotonic() + DEADLINE_S
            while not got[0] and time.monotonic() < deadline:
                left.prediction({"label": "left", "stamp_ns": 5})
                viewers[0].poll(subs[0], got[0], 0.05)
            viewers[1].poll(subs[1], got[1], 0.2)
            assert json.loads(got[0]["/prediction"][1])["label"] == "left"
            assert got[1] == {}

    # close() stopped both servers (and may be called again); the bound port is still reported.
    left.close()
    assert left.port > 0
    with (
        pytest.raises((OSError, WebSocketException)),  # refused, or dropped mid-handshake
        connect(f"ws://127.0.0.1:{left.port}", subprotocols=[SUBPROTOCOL], open_timeout=1) as ws,
    ):
        ws.recv(timeout=1)


def test_a_port_already_in_use_is_a_clear_error():
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(OSError, match=f"127.0.0.1:{port}") as info:
            FoxgloveLive(port=port)
        assert info.value.errno == errno.EADDRINUSE
        assert time.monotonic() - start < DEADLINE_S
    finally:
        taken.close()
