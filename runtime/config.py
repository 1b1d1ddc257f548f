"""Configs of the agent, its control server and the operator console.

Why dataclasses with working defaults: ``python -m runtime.agent`` must run on a fresh
checkout with no config file at all (everything on 127.0.0.1, CurveZMQ on), and a launch
file only names what differs. Loaded with ``common.config.load_config`` from one TOML
file with ``[agent]``, ``[control]`` and ``[console]`` tables::

    [agent]
    backend = "onnxruntime"
    checkpoint_dir = "state/"

    [control]
    endpoint = "tcp://0.0.0.0:5570"
    keys_dir = "keys/"

Load them with ``load_section``: it refuses keys that only a command-line flag may set
(``insecure``: ``--insecure`` on the agent, the console and the demo). Why: a launch file is
copied from machine to machine, and one stray ``insecure = true`` would open a robot to anyone
on its network; a flag has to be typed for each start, and only for a loopback endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.config import ConfigError, load_config, read_toml
from runtime.access import is_loopback
from training.openset import RULES as OPEN_SET_RULES

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
T = TypeVar("T")
CLI_ONLY = {"insecure": "--insecure"}  # config keys refused in a TOML file -> the flag that sets them


def _check_insecure(name: str, insecure: bool, endpoint: str) -> None:
    if insecure and not is_loopback(endpoint):
        raise ValueError(f"--insecure refuses {name}={endpoint!r}: without CurveZMQ the control channel must stay "
                         "on a loopback address (tcp://127.0.0.1:PORT, ipc://...); use keys (python -m runtime.keys)")


def _check_endpoint(name: str, value: str) -> None:
    if not isinstance(value, str) or "://" not in value:
        raise ValueError(f"{name}={value!r} is not a ZeroMQ endpoint like 'tcp://127.0.0.1:5570'")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def _check_range(obj: Any, lo: float, hi: float, *names: str) -> None:
    """Each named field of ``obj`` is in [lo, hi] (closed), else "name=value must be in [lo, hi]"."""
    for name in names:
        value = getattr(obj, name)
        if not lo <= value <= hi:
            raise ValueError(f"{name}={value!r} must be in [{lo}, {hi}]")


@dataclass(kw_only=True)
class AgentConfig:
    """The agent process: where sensors come from, where predictions go, learn gates."""

    sensors: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5556"])  # connect
    predictions: str = "tcp://127.0.0.1:5560"  # bind (PUB)
    backend: str = "auto"
    model_dir: Path = Path("models")
    # a models bundle (`python -m export bundle`): verified and unpacked into model_dir at start-up
    # unless model_dir already holds it; with it, a missing model is an error, never a local export
    model_bundle: Path | None = None
    checkpoint_dir: Path = Path("state/")
    # the only place `learn-new-task --source mcap:PATH` may read: PATH is relative to it (or absolute inside
    # it); '..' and symlinks out of it are refused. Relative to the agent's working directory, like model_dir
    recordings_dir: Path = Path("recordings")
    keep_checkpoints: int = 3
    stale_s: float = 1.0  # a modality silent this long is left out of the sample
    min_new_task_acc: float = 0.5  # learn gate: held-out accuracy on the new task
    max_old_task_drop: float = 0.10  # learn gate: largest accepted drop on old tasks
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sensors, str):
            self.sensors = [self.sensors]
        if not self.sensors:
            raise ValueError("sensors=[] must name at least one endpoint")
        for ep in self.sensors:
            _check_endpoint("sensors", ep)
        _check_endpoint("predictions", self.predictions)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        self.model_dir = Path(self.model_dir)
        if self.model_bundle is not None:
            self.model_bundle = Path(self.model_bundle)
        self.checkpoint_dir = Path(self.checkpoint_dir)
        self.recordings_dir = Path(self.recordings_dir)
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints!r} must be >= 2 (rollback needs one)")
        _check_positive("stale_s", self.stale_s)
        _check_range(self, 0, 1, "min_new_task_acc", "max_old_task_drop")


@dataclass(kw_only=True)
class ServeConfig:
    """Serving and learning-job knobs of the agent (``[serve]`` table)."""

    topk: int = 3
    image_threads: int = 2  # intra-op threads of the image backbone session (the per-frame path)
    backend_threads: int = 1  # intra-op threads of the audio and IMU sessions, and of a worker's backbones
    side_threads: int = 1  # ONNX Runtime threads of the served side network
    side_device: str = "cpu"  # "cuda": the side network on ONNX Runtime's CUDA EP (onnxruntime-gpu)
    gil_switch_s: float = 0.001  # sys.setswitchinterval of the agent process (Python's default: 0.005)
    idle_rate_hz: float = 30.0  # prediction rate from audio/IMU alone while the camera is stale
    smooth_s: float = 0.5  # window of the smoothed label (sensor time)
    abstain_below: float = 0.5  # a confidence below this is "unknown"
    unknown_share: float = 0.5  # the smoothed label is "unknown" when more of its window is unknown
    open_set: bool = True  # a sample far from every learned class (tap space) is unknown
    open_set_quantile: float = 0.99  # open-set thresholds: this quantile of held-out distances ...
    open_set_margin: float = 1.25  # ... times this margin
    open_set_rule: str = "mean"  # modalities combine by the "mean" (or "max") of distance / threshold
    camera_topic: str = "camera"
    mic_topic: str = "mic"
    imu_topic: str = "imu"
    capture_lead_s: float = 1.0  # live source: "show LABEL now", then this long before its capture starts
    holdout: float = 0.2  # share of a new task's samples (time span for live ones) kept for the gate
    holdout_guard_s: float = 1.0  # live samples this close before the holdout block are not used
    dataset_per_class: int = 60  # samples per class for a dataset:SPLIT source
    eval_per_class: int = 40  # samples per class for the evaluate command
    initial_task: str = ""  # "name:label,label:source" learned at first start (no checkpoint)
    job_nice: int = 10  # learning workers and job threads run at this nice level: serving comes first
    worker_idle_sched: bool = True  # Linux: the learning worker runs as SCHED_IDLE (only on otherwise idle cores)
    worker_timeout_s: float = 900.0  # a learning worker silent for this long is killed
    work_dir: str = ""  # job directories; "" = /dev/shm when writable, else the system temp dir
    taught_bytes: int = 64 << 20  # taught samples kept (oldest captures dropped beyond it)
    reservoir_size: int = 1000  # held-out samples kept for the gate's old-task check (class-balanced)
    reservoir_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 0.9:
            raise ValueError(f"holdout={self.holdout} must be in (0, 0.9)")
        if self.dataset_per_class < 5:
            raise ValueError(f"dataset_per_class={self.dataset_per_class} must be >= 5")
        for name in ("topk", "image_threads", "backend_threads", "side_threads", "eval_per_class", "taught_bytes", "reservoir_size",
                     "reservoir_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("idle_rate_hz", "smooth_s", "worker_timeout_s", "open_set_margin", "gil_switch_s"):
            _check_positive(name, getattr(self, name))
        _check_range(self, 0, 1, "abstain_below", "unknown_share", "open_set_quantile")
        if self.side_device not in ("cpu", "cuda"):
            raise ValueError(f"side_device={self.side_device!r} must be 'cpu' or 'cuda'")
        if self.open_set_rule not in OPEN_SET_RULES:
            raise ValueError(f"open_set_rule={self.open_set_rule!r} must be one of {OPEN_SET_RULES}")
        _check_range(self, 0, 60, "capture_lead_s")
        if self.holdout_guard_s < 0:
            raise ValueError(f"holdout_guard_s={self.holdout_guard_s!r} must be >= 0")
        _check_range(self, 0, 19, "job_nice")


@dataclass(kw_only=True)
class ControlConfig:
    """The agent's control server (see ``runtime.control.ControlServer``)."""

    endpoint: str = "tcp://127.0.0.1:5570"  # bind (ROUTER)
    insecure: bool = False  # --insecure only (refused in TOML): no CurveZMQ, loopback endpoints only, a WARNING
    keys_dir: Path = Path("keys/")  # server.key_secret + operators/*.key and viewers/*.key allow-lists
    heartbeat_timeout_s: float = 10.0  # a console silent this long leaves the session table
    max_request_bytes: int = 65536  # larger frames get a "too_large" error reply
    hard_max_bytes: int = 1 << 20  # larger frames: the connection is dropped (ZMQ_MAXMSGSIZE)
    max_depth: int = 16  # deeper msgpack nesting gets a "too_deep" error reply
    poll_ms: int = 50
    sndhwm: int = 100  # per-client send queue; full -> the reply is dropped, never blocks
    slow_handler_s: float = 0.5  # handlers slower than this are logged (they stall the loop)

    def __post_init__(self) -> None:
        _check_endpoint("endpoint", self.endpoint)
        _check_insecure("endpoint", self.insecure, self.endpoint)
        self.keys_dir = Path(self.keys_dir)
        _check_positive("heartbeat_timeout_s", self.heartbeat_timeout_s)
        if self.max_request_bytes < 64:
            raise ValueError(f"max_request_bytes={self.max_request_bytes!r} must be >= 64")
        if self.hard_max_bytes < self.max_request_bytes:
            raise ValueError(f"hard_max_bytes={self.hard_max_bytes!r} must be >= max_request_bytes")
        _check_range(self, 1, 512, "max_depth")
        _check_range(self, 1, 1000, "poll_ms")
        if self.sndhwm < 1:
            raise ValueError(f"sndhwm={self.sndhwm!r} must be >= 1")
        _check_positive("slow_handler_s", self.slow_handler_s)


@dataclass(kw_only=True)
class ConsoleConfig:
    """The operator console (``python -m runtime.console``)."""

    connect: str = "tcp://127.0.0.1:5570"
    insecure: bool = False  # --insecure only (refused in TOML); loopback endpoints only
    keys_dir: Path = Path("keys/")
    key_name: str | None = None  # console key (operator or viewer) in keys_dir/clients/; None: the only one
    timeout_s: float = 5.0  # per request; a lost reply is a timeout error
    poll_s: float = 0.25  # progress polling period while a job runs

    def __post_init__(self) -> None:
        _check_endpoint("connect", self.connect)
        _check_insecure("connect", self.insecure, self.connect)
        self.keys_dir = Path(self.keys_dir)
        _check_positive("timeout_s", self.timeout_s)
        _check_positive("poll_s", self.poll_s)


@dataclass(kw_only=True)
class FleetConfig:
    """The agent's side of the fleet (``[fleet]``): where skill packages go and come from.

    Export and import work without a fleet (``export-skill``/``import-skill`` from a console,
    files carried by hand); ``address`` (``--fleet HOST:PORT``) adds Flower's SuperNode, which
    uploads the spool's outbox and fills its inbox each round (``runtime.fleet``).
    """

    address: str | None = None  # the fleet server's SuperLink Fleet API, host:port; None: no fleet
    key_file: Path = Path("keys/fleet.key")  # the fleet's shared signing key (python -m runtime.fleet keygen)
    robot: str = ""  # this robot's name in the fleet; "" = the host name
    spool_dir: Path | None = None  # outbox/inbox of the Flower client; None: <checkpoint_dir>/fleet
    skills_dir: Path | None = None  # export-skill writes, import-skill reads here; None: <checkpoint_dir>/skills
    max_skill_bytes: int = 1_000_000  # one package's budget (exemplars fill what the rest leaves)
    auto_export: bool = True  # with a fleet: every accepted local task goes to the outbox
    import_poll_s: float = 2.0  # how often the agent looks for received packages (when idle)
    root_certificates: Path | None = None  # CA of the SuperLink's TLS certificate
    auth_private_key: Path | None = None  # SuperNode authentication key (flower-supernode)
    node_port: int | None = None  # the SuperNode's local runtime API port (Flower's default 9094; two agents on a host need two)
    insecure: bool = False  # no TLS (loopback only; a flag: --fleet-insecure)

    def __post_init__(self) -> None:
        self.key_file = Path(self.key_file)
        for name in ("spool_dir", "skills_dir", "root_certificates", "auth_private_key"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.max_skill_bytes < 64 << 10:
            raise ValueError(f"max_skill_bytes={self.max_skill_bytes!r} must be >= 65536")
        _check_positive("import_poll_s", self.import_poll_s)
        if self.address is None:
            return
        from runtime.fleet import node  # the SuperNode's own rules: a bad address fails here, at start

        host, _ = node.split_address(self.address)
        if self.insecure and not node.is_loopback(host):
            raise ValueError(f"--fleet-insecure refuses address={self.address!r}: without TLS the fleet link must "
                             "stay on loopback; give [fleet] root_certificates instead")


def load_section(cls: type[T], path: str | Path | None, section: str, **overrides: Any) -> T:
    """``common.config.load_config`` that refuses the ``CLI_ONLY`` keys in the TOML file with a
    message saying which flag replaced them (overrides, i.e. flags, may still set them)."""
    if path is not None:
        table = read_toml(path).get(section, {})
        for key, cli_flag in CLI_ONLY.items():
            flag = "--fleet-insecure" if section == "fleet" and key == "insecure" else cli_flag
            if isinstance(table, dict) and key in table:
                raise ConfigError(f"[{section}] {key} = {table[key]!r} in {path}: {key!r} is now a command-line flag "
                                  f"only; remove it from the file and start with {flag} (development only, loopback "
                                  "endpoints only)")
    return load_config(cls, path, section, **overrides)


def load_runtime_config(path: str | Path | None = None, **agent_overrides: Any) -> tuple[AgentConfig, ControlConfig]:
    """The agent's two configs from one TOML file (``[agent]`` and ``[control]``)."""
    return (
        load_section(AgentConfig, path, "agent", **agent_overrides),
        load_section(ControlConfig, path, "control"),
    )
