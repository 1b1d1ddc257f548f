"""The fleet's Flower apps: a ServerApp that gathers and forwards skill packages, and the robots' ClientApp.

A round has two phases, both Flower messages of the Message API (``query.<action>``):

1. ``query.offer``: server -> every node: the round number. The node replies its robot name, its
   have-list (``Spool.have``) and its pending uploads as bytes. The server verifies and stores
   each upload (``SkillStore.add``: a tampered or foreign package is refused, counted by reason).
2. ``query.deliver``: server -> each node that replied: the packages it lacks (from other robots,
   not in its have-list), and the acks of its uploads (stored or refused: settled either way, so
   they are not offered again). The node writes them with ``Spool.deliver`` and replies the ids it
   holds; the server records them as delivered.

Why the server keys everything by the robot name a node reports and never by Flower's node id:
node ids change whenever a SuperNode restarts, the robot's name and spool do not. A node whose
spool has the ``offline`` marker raises (simulated lost connectivity): Flower returns an error
reply, the server counts the robot as missed and goes on; the next round compares its have-list
again, so it catches up without any bookkeeping of what it missed.

With a fixed number of rounds (simulation) every round runs both phases. With ``rounds=None``
(deployment) the server polls every ``poll_s`` (the offer phase) and runs the deliver phase when a
poll brought uploads (a robot learned a new task), when a node lacks a stored package (a robot came
back), or when ``round_every_s`` passed (the schedule). Each round is one JSON line in
``<store_dir>/rounds.jsonl``; round numbers continue across server restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from common.config import require, require_non_negative, require_positive
from runtime.fleet.spool import Spool, robot_name
from runtime.fleet.store import SkillStore, append_round, read_rounds
from training.skills import skill_id

log = logging.getLogger(__name__)

OFFER = "query.offer"
DELIVER = "query.deliver"
RECORD = "fleet"
MAX_MESSAGE_BYTES = 32_000_000  # packages per message; the rest follows next round (gRPC allows 512 MB)
T = TypeVar("T")


# ---- messages (each one ConfigRecord named "fleet": lists of str and bytes travel as they are) --------
@dataclass
class Offer:
    round: int


@dataclass
class OfferReply:
    robot: str
    have: list[str]
    upload_ids: list[str]
    uploads: list[bytes]


@dataclass
class Delivery:
    round: int
    ids: list[str] = field(default_factory=list)
    packages: list[bytes] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    refused_ids: list[str] = field(default_factory=list)
    refused_reasons: list[str] = field(default_factory=list)


@dataclass
class DeliveryReply:
    robot: str
    stored: list[str]


def pack(msg: Any) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(asdict(msg))})


def unpack(cls: type[T], message: Message) -> T:
    """``cls`` from a Flower message's content; ``ValueError`` naming the field that does not fit
    (a node's reply is input from the network: it is checked before the server uses it)."""
    kind = message.metadata.message_type
    rec = message.content.config_records.get(RECORD) if message.has_content() else None
    if rec is None:
        raise ValueError(f"{kind} message without a {RECORD!r} record")
    kwargs = {}
    for name, hint in typing.get_type_hints(cls).items():
        value, outer = rec.get(name), typing.get_origin(hint) or hint
        inner = typing.get_args(hint)[0] if outer is list else None
        if not isinstance(value, outer) or (inner and not all(isinstance(v, inner) for v in value)):
            raise ValueError(f"{kind} message: {name!r} is not a {hint}")
        kwargs[name] = list(value) if inner else value
    return cls(**kwargs)


def _capped(items: list[tuple[str, bytes]], limit: int = MAX_MESSAGE_BYTES) -> list[tuple[str, bytes]]:
    """The first items that fit in ``limit`` bytes (always at least one)."""
    out, total = [], 0
    for ident, data in items:
        if out and total + len(data) > limit:
            break
        out.append((ident, data))
        total += len(data)
    return out


# ---- the server ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How the ServerApp runs; ``rounds=None``: forever (deployment)."""

    store_dir: Path
    rounds: int | None = None
    round_every_s: float = 300.0
    poll_s: float = 10.0
    min_nodes: int = 1
    reply_timeout_s: float = 120.0
    wait_nodes_s: float | None = None  # None: wait for min_nodes forever

    def __post_init__(self) -> None:
        require(self, ["rounds"], lambda v: v is None or v >= 1, ">= 1 or None")
        require_non_negative(self, "round_every_s", "poll_s", "reply_timeout_s")
        require_positive(self, "min_nodes")


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``."""

    round: int
    trigger: str
    nodes: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    missed_why: dict[str, str] = field(default_factory=dict)
    uploaded: int = 0
    uploaded_ids: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    started_s: float = 0.0


@dataclass
class _Round:
    """One round in progress: its record, who missed it (node id -> why), offers and deliveries."""

    rec: RoundRecord
    missed: dict[int, str] = field(default_factory=dict)
    offers: dict[int, OfferReply] = field(default_factory=dict)
    plans: dict[int, Delivery] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)


class _Coordinator:
    """The server's rounds over one Grid (the body of the ServerApp's main)."""

    def __init__(self, settings: ServerSettings, key: bytes) -> None:
        self.s = settings
        self.store = SkillStore(settings.store_dir, key)
        self.names: dict[int, str] = {}  # this run's node id -> robot name, for the missed list only

    def wait_nodes(self, grid: Grid) -> list[int]:
        start, said = time.monotonic(), False
        while len(nodes := sorted(grid.get_node_ids())) < self.s.min_nodes:
            if self.s.wait_nodes_s is not None and time.monotonic() - start > self.s.wait_nodes_s:
                raise TimeoutError(f"{len(nodes)} of min_nodes={self.s.min_nodes} nodes connected "
                                   f"after {self.s.wait_nodes_s} s")
            if not said:
                log.info("waiting for %d node(s), %d connected", self.s.min_nodes, len(nodes))
                said = True
            time.sleep(min(self.s.poll_s, 1.0) or 0.05)
        return nodes

    def _exchange(self, grid: Grid, r: _Round, kind: str, contents: dict[int, Any], cls: type[T]) -> dict[int, T]:
        """One message per node, the replies unpacked as ``cls``; errors and silence go into ``r.missed``."""
        msgs = [Message(pack(c), dst_node_id=n, message_type=kind, group_id=str(r.rec.round),
                        ttl=max(self.s.reply_timeout_s, 10.0)) for n, c in contents.items()]
        replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs, timeout=self.s.reply_timeout_s)}
        out = {}
        for node in contents:
            reply = replies.get(node)
            try:
                if reply is None:
                    raise ValueError(f"no {kind} reply within {self.s.reply_timeout_s} s")
                if reply.has_error():
                    raise ValueError(f"{kind}: {reply.error.reason.strip()}")
                out[node] = unpack(cls, reply)
            except ValueError as exc:
                r.missed[node] = str(exc)
                log.info("round %d: %s missed (%s)", r.rec.round, self.names.get(node, f"node {node}"), str(exc)[:300])
        return out

    def offer(self, grid: Grid, r: _Round, nodes: list[int]) -> None:
        """The offer phase: store each upload, plan each node's delivery (acks, refusals, packages)."""
        r.offers = self._exchange(grid, r, OFFER, {n: Offer(round=r.rec.round) for n in nodes}, OfferReply)
        for node, off in list(r.offers.items()):
            self.names[node] = off.robot
            if len(off.upload_ids) != len(off.uploads):
                r.missed[node] = f"malformed offer: {len(off.upload_ids)} ids for {len(off.uploads)} uploads"
                del r.offers[node]
                continue
            plan = r.plans[node] = Delivery(round=r.rec.round)
            for claimed, data in zip(off.upload_ids, off.uploads, strict=True):
                known = self.store.entry(skill_id(data)) is not None
                ident, reason = self.store.add(data, robot=off.robot, round=r.rec.round)
                plan.acked.append(claimed)
                if ident is None:
                    r.rec.refused[reason] = r.rec.refused.get(reason, 0) + 1
                    plan.refused_ids.append(claimed)
                    plan.refused_reasons.append(reason)
                elif not known:
                    r.rec.uploaded += 1
                    r.rec.uploaded_ids.append(ident)
        for node, off in r.offers.items():  # after every upload of the round is stored
            for ident, data in _capped(self.store.missing_for(off.robot, set(off.have) | set(off.upload_ids))):
                r.plans[node].ids.append(ident)
                r.plans[node].packages.append(data)

    def deliver(self, grid: Grid, r: _Round) -> None:
        for node, got in self._exchange(grid, r, DELIVER, r.plans, DeliveryReply).items():
            robot, sent = r.offers[node].robot, set(r.plans[node].ids)
            stored = [i for i in got.stored if i in sent]
            self.store.mark_delivered(robot, stored)
            r.rec.delivered[robot] = r.rec.delivered.get(robot, 0) + len(stored)

    def finish(self, r: _Round) -> None:
        """Complete the record and append it to ``rounds.jsonl``."""
        replied = {off.robot for n, off in r.offers.items() if n not in r.missed}
        r.rec.nodes = sorted(replied)
        why = {self.names.get(n, f"node-{n}"): reason[-300:] for n, reason in r.missed.items()}
        r.rec.missed = sorted(set(why) - replied)
        r.rec.missed_why = {name: why[name] for name in r.rec.missed}
        r.rec.seconds = round(time.monotonic() - r.t0, 3)
        append_round(self.s.store_dir, asdict(r.rec))
        rec = r.rec
        log.info("round %d (%s): %d node(s), %d missed, %d uploaded, %d refused, delivered %s in %.2f s",
                 rec.round, rec.trigger, len(rec.nodes), len(rec.missed), rec.uploaded, sum(rec.refused.values()),
                 rec.delivered, rec.seconds)

    def run(self, grid: Grid) -> None:
        done = read_rounds(self.s.store_dir)
        rnd = (done[-1]["round"] if done else 0) + 1
        last = rnd + self.s.rounds - 1 if self.s.rounds is not None else math.inf
        last_round_t = -math.inf
        while rnd <= last:
            nodes = self.wait_nodes(grid)
            r = _Round(RoundRecord(round=rnd, trigger="round", started_s=round(time.time(), 3)))
            self.offer(grid, r, nodes)
            if self.s.rounds is None:  # deployment: is this poll a round?
                if any(p.acked for p in r.plans.values()):
                    r.rec.trigger = "upload"
                elif any(p.ids for p in r.plans.values()):
                    r.rec.trigger = "missing"
                elif time.monotonic() - last_round_t >= self.s.round_every_s:
                    r.rec.trigger = "schedule"
                else:
                    time.sleep(self.s.poll_s)
                    continue
            self.deliver(grid, r)
            self.finish(r)
            last_round_t, rnd = time.monotonic(), rnd + 1
            if self.s.rounds is None:
                time.sleep(self.s.poll_s)


def make_server_app(store_dir: str | Path, key: bytes, *, rounds: int | None, round_every_s: float, poll_s: float,
                    min_nodes: int, reply_timeout_s: float = 120.0, wait_nodes_s: float | None = None) -> ServerApp:
    """The fleet's ServerApp over the skill store in ``store_dir`` (see the module docstring)."""
    settings = ServerSettings(store_dir=Path(store_dir), rounds=rounds, round_every_s=round_every_s, poll_s=poll_s,
                              min_nodes=min_nodes, reply_timeout_s=reply_timeout_s, wait_nodes_s=wait_nodes_s)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _Coordinator(settings, key).run(grid)

    return app


def settings_from_run_config(context: Context) -> tuple[ServerSettings, Path]:
    """ServerSettings and the key file from a deployed run's config (the app's
    ``[tool.flwr.app.config]``, written by ``python -m runtime.fleet server``); ``rounds=0``: forever."""
    cfg = dict(context.run_config)
    kwargs: dict[str, Any] = {f.name: cfg[f.name.replace("_", "-")] for f in dataclasses.fields(ServerSettings)
                              if f.name.replace("_", "-") in cfg}
    kwargs["store_dir"] = Path(str(kwargs.get("store_dir", "fleet-store")))
    kwargs["rounds"] = int(kwargs.get("rounds") or 0) or None
    kwargs["wait_nodes_s"] = float(kwargs.get("wait_nodes_s") or 0) or None
    return ServerSettings(**kwargs), Path(str(cfg.get("key-file", "fleet.key")))


def deployed_server_app() -> ServerApp:
    """The ServerApp of a Flower App Bundle: its settings come with the run (``flwr run``), not
    from arguments, because the SuperLink starts it in a process of its own."""
    from training.skills import load_key

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings, key_file = settings_from_run_config(context)
        _Coordinator(settings, load_key(key_file)).run(grid)

    return app


# ---- the robots' side ------------------------------------------------------------------------------
def _node_spool(context: Context, spools: Sequence[Path] | None) -> Spool:
    cfg = context.node_config
    if spools is not None:
        i = int(cfg["partition-id"])
        return Spool(spools[i], robot_name(spools[i], f"robot-{i}"))
    missing = [k for k in ("spool", "robot") if not str(cfg.get(k, ""))]
    if missing:
        raise ValueError(f"the SuperNode's --node-config lacks {missing}: start it with "
                         "--node-config 'spool=\"/path/to/spool\" robot=\"name\"' (runtime.fleet.node)")
    return Spool(str(cfg["spool"]), str(cfg["robot"]))


def _require_online(spool: Spool) -> None:
    if spool.offline:
        raise ConnectionError(f"robot {spool.robot} is offline (marker {spool.offline_marker})")


def make_client_app(spools: Sequence[Path] | None = None) -> ClientApp:
    """The robots' ClientApp; ``spools``: in simulation, indexed by the node's ``partition-id``;
    None in deployment, where the node config names the spool and the robot."""
    roots = None if spools is None else [Path(p) for p in spools]
    app = ClientApp()

    @app.query("offer")
    def offer(message: Message, context: Context) -> Message:
        spool = _node_spool(context, roots)
        _require_online(spool)
        rnd = unpack(Offer, message).round
        uploads = _capped(spool.pending_uploads())
        log.debug("robot %s, round %d: offering %d package(s)", spool.robot, rnd, len(uploads))
        reply = OfferReply(robot=spool.robot, have=sorted(spool.have()), upload_ids=[i for i, _ in uploads],
                           uploads=[d for _, d in uploads])
        return Message(pack(reply), reply_to=message)

    @app.query("deliver")
    def deliver(message: Message, context: Context) -> Message:
        spool = _node_spool(context, roots)
        _require_online(spool)
        got = unpack(Delivery, message)
        stored = []
        for ident, data in zip(got.ids, got.packages, strict=True):
            if skill_id(data) != ident:
                log.warning("robot %s, round %d: package %s arrived changed (id %s); not stored", spool.robot,
                            got.round, ident, skill_id(data))
                continue
            path = spool.deliver(data)
            stored.append(ident)
            if path is not None:
                log.info("robot %s, round %d: received %s", spool.robot, got.round, path.name)
        for ident, reason in zip(got.refused_ids, got.refused_reasons, strict=True):
            log.warning("robot %s: the fleet server refused upload %s: %s", spool.robot, ident, reason)
        spool.mark_uploaded(got.acked)
        return Message(pack(DeliveryReply(robot=spool.robot, stored=stored)), reply_to=message)

    return app


# ---- the simulation ------------------------------------------------------------------------------
@contextlib.contextmanager
def _flwr_log_level(level: int) -> Iterator[None]:
    """Flower's logger at ``level`` for the duration (its own handler prints every engine event)."""
    logger = logging.getLogger("flwr")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def simulate(spools: Sequence[tuple[Path, str]], store_dir: Path, key: bytes, *, rounds: int,
             reply_timeout_s: float = 60.0, quiet: bool = True) -> list[dict[str, Any]]:
    """Run the fleet for ``rounds`` rounds on Flower's simulation engine (Ray backend, one virtual
    SuperNode per ``(spool directory, robot name)``, 1 CPU each); the rounds' records.

    Why this starts Ray itself: so that Ray gets only what it needs (no more CPUs than robots, a
    small object store, no dashboard, telemetry off, this interpreter's ``sys.path``) and Flower
    does not rewrite this process's ``PYTHONPATH`` as its own start-up of Ray would. Flower shuts
    Ray down when the run ends (and so would an exception here), which is also why a process that
    already runs Ray is refused: its Ray would be shut down under it."""
    import ray
    from flwr.simulation import run_simulation

    if not spools:
        raise ValueError("simulate needs at least one (spool, robot)")
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; simulate starts (and shuts down) its own")
    roots = [Spool(path, robot).root for path, robot in spools]
    store_dir = Path(store_dir)
    before = len(read_rounds(store_dir))
    server = make_server_app(store_dir, key, rounds=rounds, round_every_s=0.0, poll_s=0.05, min_nodes=len(roots),
                             reply_timeout_s=reply_timeout_s, wait_nodes_s=60.0)
    client = make_client_app(roots)
    path = os.pathsep.join(p for p in (os.path.abspath(x) if x else os.getcwd() for x in sys.path) if p)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        if quiet:  # Ray's FutureWarning about accelerator variables (no GPU is asked for here)
            warnings.simplefilter("ignore", FutureWarning)
        ray.init(num_cpus=min(len(roots), os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=80 << 20, logging_level=logging.WARNING if quiet else logging.INFO,
                 log_to_driver=not quiet, runtime_env={"env_vars": {"PYTHONPATH": path, "FLWR_TELEMETRY_ENABLED": "0"}})
    try:
        with _flwr_log_level(logging.CRITICAL if quiet else logging.INFO):
            run_simulation(server_app=server, client_app=client, num_supernodes=len(roots), backend_name="ray",
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    records = read_rounds(store_dir)[before:]
    log.info("simulated %d round(s) of %d robot(s) in %.1f s", len(records), len(roots), time.monotonic() - t0)
    return records
