"""Sensor drivers: one ``SensorDriver`` subclass per device kind, found by name.

Importing this package registers "camera", "mic" and "imu" without importing OpenCV,
sounddevice or pyserial: each driver imports its library in ``connect``.

    from sensors.drivers import get_driver
    cls = get_driver("imu")
    with cls(cls.config_cls(file="imu.csv", batch=10)) as imu:
        msg = imu.read(timeout_s=1.0)
"""

from sensors.drivers.base import DRIVERS, SensorDriver, get_driver, register_driver
from sensors.drivers.camera import CameraConfig, CameraDriver
from sensors.drivers.imu_serial import ImuSerialConfig, ImuSerialDriver, parse_line
from sensors.drivers.microphone import MicrophoneConfig, MicrophoneDriver

__all__ = [
    "DRIVERS",
    "CameraConfig",
    "CameraDriver",
    "ImuSerialConfig",
    "ImuSerialDriver",
    "MicrophoneConfig",
    "MicrophoneDriver",
    "SensorDriver",
    "get_driver",
    "register_driver",
    "parse_line",
]
