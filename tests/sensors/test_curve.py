"""CurveZMQ on sensor streams, real sockets on 127.0.0.1: the right publisher key lets data
through, an unknown or wrong one lets nothing through, plain streams still work, and the
publisher's optional ZAP allow-list admits only listed subscribers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from common.config import load_config
from runtime.intake import IntakeConfig, SensorIntake
from sensors.curve import CurveClient, CurveServer, create_keys, main, public_key
from sensors.errors import CurveKeyError
from sensors.publish import PublishConfig
from sensors.record import RecordConfig
from sensors.transport import LatestReceiver, LosslessReader, Publisher
from sensors.wire import Image

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("camera", "rogue", "agent", "stranger"):
        create_keys(name, d)
    (d / "subscribers").mkdir()
    (d / "subscribers" / "agent.key").write_bytes((d / "agent.key").read_bytes())
    return d


def _frame(i: int) -> Image:
    return Image(data=np.full((8, 8, 3), i, np.uint8))


def _flows(pub: Publisher, reader: LosslessReader, tries: int = 40) -> bool:
    """Publish until one message arrives (the handshake and subscription take a moment)."""
    for i in range(tries):
        pub.publish("camera", _frame(i))
        if reader.recv(100) is not None:
            return True
    return False


def test_key_files_are_zmq_auth_certificates_with_a_private_secret(keys: Path) -> None:
    public, secret = zmq.auth.load_certificate(keys / "camera.key_secret")
    assert secret is not None and public == public_key(keys / "camera.key") == public_key(public.decode())
    assert (keys / "camera.key_secret").stat().st_mode & 0o077 == 0
    with pytest.raises(CurveKeyError, match="already exists"):
        create_keys("camera", keys)
    with pytest.raises(CurveKeyError, match="no secret"):
        CurveServer.from_files(keys / "camera.key")
    with pytest.raises(CurveKeyError, match="no CurveZMQ key file"):
        CurveClient.from_files({"tcp://127.0.0.1:1": str(keys / "nobody.key")})


def test_a_secret_key_others_can_read_is_refused_as_ssh_does(tmp_path: Path) -> None:
    _, secret = create_keys("camera", tmp_path)
    CurveServer.from_files(secret)
    secret.chmod(0o640)
    with pytest.raises(CurveKeyError, match=r"accessible by group or others \(mode 0640\).*chmod 600"):
        CurveServer.from_files(secret)


def test_right_publisher_key_flows_and_the_traffic_is_curve(ctx: zmq.Context, keys: Path) -> None:
    server = CurveServer.from_files(keys / "camera.key_secret")
    with Publisher("tcp://127.0.0.1:0", context=ctx, curve=server) as pub:
        client = CurveClient.from_files({pub.endpoint: str(keys / "camera.key")})
        with LosslessReader(pub.endpoint, ["camera"], context=ctx, curve=client) as reader, \
                LatestReceiver(pub.endpoint, ["camera"], context=ctx, curve=client) as rx:
            assert pub.wait_for_subscribers(2, TIMEOUT_S)
            assert _flows(pub, reader)
            assert rx.wait_for("camera", TIMEOUT_S) is not None
            stats = reader.stats()
            assert stats.invalid == {} and stats.link.get("connected", 0) == 1 and "handshake_failed" not in stats.link
        with LosslessReader(pub.endpoint, ["camera"], context=ctx) as plain:  # no Curve: no data
            assert not pub.wait_for_subscribers(3, 0.5)
            assert not _flows(pub, plain, tries=5) and plain.stats().received == {}


@pytest.mark.parametrize("impostor", ["rogue key", "plain"])
def test_an_unknown_publisher_gets_nothing_accepted(ctx: zmq.Context, keys: Path, impostor: str) -> None:
    """The intake expects the camera's key; a publisher with another key pair, or none, binds there."""
    curve = CurveServer.from_files(keys / "rogue.key_secret") if impostor == "rogue key" else None
    with Publisher("tcp://127.0.0.1:0", context=ctx, curve=curve) as pub:
        client = CurveClient.from_files({pub.endpoint: str(keys / "camera.key")})
        with LosslessReader(pub.endpoint, ["camera"], context=ctx, curve=client) as reader:
            assert not pub.wait_for_subscribers(1, 0.5)  # the handshake never completes
            assert not _flows(pub, reader, tries=10)
            deadline = time.monotonic() + TIMEOUT_S
            while reader.stats().link.get("handshake_failed", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = reader.stats()
    assert stats.received == {} and stats.invalid == {}
    assert stats.link.get("handshake_failed", 0) >= 1 and "connected" not in stats.link


def test_plain_streams_still_work_without_any_key(ctx: zmq.Context) -> None:
    with Publisher("tcp://127.0.0.1:0", context=ctx) as pub, \
            LosslessReader(pub.endpoint, ["camera"], context=ctx) as reader:
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        assert _flows(pub, reader)


def test_the_zap_allow_list_admits_only_listed_subscribers(keys: Path) -> None:
    server = CurveServer.from_files(keys / "camera.key_secret", keys / "subscribers")
    with Publisher("tcp://127.0.0.1:0", curve=server) as pub:  # its own context: one ZAP handler each
        ctx = zmq.Context()
        try:
            allowed = CurveClient.from_files({pub.endpoint: str(keys / "camera.key")}, keys / "agent.key_secret")
            stranger = CurveClient.from_files({pub.endpoint: str(keys / "camera.key")}, keys / "stranger.key_secret")
            with LosslessReader(pub.endpoint, ["camera"], context=ctx, curve=stranger) as out:
                assert not pub.wait_for_subscribers(1, 0.5)
                assert not _flows(pub, out, tries=5)
            with LosslessReader(pub.endpoint, ["camera"], context=ctx, curve=allowed) as reader:
                assert pub.wait_for_subscribers(1, TIMEOUT_S)
                assert _flows(pub, reader)
        finally:
            ctx.destroy(linger=0)


def test_the_intake_accepts_only_its_configured_sensor(ctx: zmq.Context, keys: Path, tmp_path: Path) -> None:
    toml = tmp_path / "robot.toml"
    camera, impostor = (CurveServer.from_files(keys / f"{n}.key_secret") for n in ("camera", "rogue"))
    with Publisher("tcp://127.0.0.1:0", context=ctx, curve=camera) as pub, \
            Publisher("tcp://127.0.0.1:0", context=ctx, curve=impostor) as rogue:
        toml.write_text(f'[intake]\ncurve_publisher_keys = {{ "{pub.endpoint}" = "{keys / "camera.key"}", '
                        f'"{rogue.endpoint}" = "{keys / "camera.key"}" }}\n')
        cfg = load_config(IntakeConfig, toml, "intake", endpoints=[pub.endpoint, rogue.endpoint])
        assert cfg.curve_publisher_keys[pub.endpoint] == str(keys / "camera.key")
        intake = SensorIntake(cfg, ctx).start()
        try:
            assert pub.wait_for_subscribers(3, TIMEOUT_S) and not rogue.wait_for_subscribers(1, 0.3)
            for i in range(20):
                rogue.publish("camera", Image(data=np.full((8, 8, 3), 200, np.uint8)))
                pub.publish("camera", _frame(i))
                time.sleep(0.01)
            frame = intake.wait_frame(after_seq=-1, timeout_s=TIMEOUT_S)
            assert frame is not None and int(frame.image[0, 0, 0]) < 20  # the camera's, never the rogue's 200
            time.sleep(0.2)
            st = intake.reader_stats()
            assert st["received"]["camera"] <= 20 and st["link"].get("handshake_failed", 0) >= 1
            assert intake.health()["image"].messages == st["received"]["camera"]
        finally:
            intake.stop()


def test_publisher_and_recorder_configs_take_curve_from_toml(keys: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from sensors.record import main as record_main

    toml = tmp_path / "sensors.toml"
    toml.write_text(f'[publish]\ncurve_secret_key = "{keys / "camera.key_secret"}"\n'
                    f'curve_allow_dir = "{keys / "subscribers"}"\n')
    pcfg = load_config(PublishConfig, toml, "publish")
    assert pcfg.curve_secret_key.endswith("camera.key_secret") and PublishConfig().curve_secret_key == ""
    assert RecordConfig().curve_publisher_keys == {}
    server = CurveServer.from_files(keys / "camera.key_secret")
    with Publisher("tcp://127.0.0.1:0", curve=server, sndhwm=0) as pub:
        rc: list[int] = []
        argv = ["--connect", pub.endpoint, "--out", str(tmp_path / "c.mcap"), "--max-messages", "3",
                "--seconds", "20", "--curve-key", f"{pub.endpoint}={keys / 'camera.key'}", "--log-level", "WARNING"]
        t = threading.Thread(target=lambda: rc.append(record_main(argv)))
        t.start()
        assert pub.wait_for_subscribers(1, TIMEOUT_S)
        for i in range(3):
            pub.publish("camera", _frame(i))
        t.join(timeout=20)
    assert rc == [0]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["per_topic"] == {"camera": 3} and summary["invalid"] == {}
    other = ["--connect", "tcp://127.0.0.1:9", "--curve-key", f"tcp://127.0.0.1:8={keys / 'camera.key'}",
             "--seconds", "0.1"]
    assert record_main(other) == 2 and "have no publisher key" in capsys.readouterr().err  # never unauthenticated
    missing = ["--connect", "tcp://127.0.0.1:9", "--curve-key", "tcp://127.0.0.1:9=x.key", "--seconds", "0.1"]
    assert record_main(missing) == 2 and "no CurveZMQ key file x.key" in capsys.readouterr().err


def test_the_key_cli_creates_allows_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    assert main(["create", "cam1", "--dir", d]) == 0
    assert main(["create", "agent", "--dir", d]) == 0 and main(["allow", "agent", "--dir", d]) == 0
    assert main(["create", "cam1", "--dir", d]) == 1  # never overwritten
    capsys.readouterr()
    assert main(["list", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert out.count("(secret beside it)") == 2 and "subscribers/agent.key" in out
