"""What watching costs the robot, and how fast the page is: ``python -m benchmarks.web``.

One agent (ONNX Runtime, one learned task) with its sensor publishers as processes, then
alternating phases of ``--phase-s`` seconds: *off* (nothing attached) and *on* (the web console
process with ``--foxglove``, a WebSocket client reading every page message and a Foxglove
client subscribed to every channel, both as the browser and the Foxglove app on an operator's
laptop would). Serving latency is every prediction's ``latency_ms`` (camera stamp to publish)
in each phase; alternating phases keep slow drift of the machine out of the ratio. Last, a
real headless Chromium (Debian's) opens the page on this machine: the time from navigation to
the first prediction in the DOM, and each prediction's stamp to its appearance in the page.

Prints one JSON line; writes ``benchmarks/results/web.json`` and ``web.png``. Goals (issue 13):
first render < 2 s, stamp to page < 200 ms, p99 on / off <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.browser import chrome
from benchmarks.harness import (
    REPO,
    Agent,
    Proc,
    collect_predictions,
    drain,
    free_ports,
    report,
    save_figure,
    scratch_dir,
    write_toml,
)
from benchmarks.harness import subscribe_predictions as subscribe
from benchmarks.reliability import Sensors, fresh_setup, make_baseline
from runtime import keys


class Watchers:
    """The web console process plus a page client and a Foxglove client, reading until stopped."""

    def __init__(self, root: Path, setup: Any) -> None:
        http_port, fox_port = free_ports(2)
        self.proc = Proc("web", ["-m", "runtime.web", "--port", str(http_port), "--foxglove", str(fox_port),
                                 "--config", str(self._config(root, setup))], root / f"web-{time.monotonic_ns()}.log")
        self.url = self._wait_url()
        self.fox_port = fox_port
        self.counts = {"page": 0, "foxglove": 0}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._page, self._foxglove)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _config(root: Path, setup: Any) -> Path:
        if not (setup.kdir / "clients" / "web.key_secret").exists():
            keys.create("web", setup.kdir)
        return write_toml(root / "web.toml", {"web": {
            "control": setup.control_ep, "predictions": setup.pred_ep, "sensors": setup.sensors,
            "keys_dir": setup.kdir, "key_name": "web", "state_dir": root / "web-state"}})

    def _wait_url(self, timeout_s: float = 30.0) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            m = re.search(r"console: (http://\S+)", self.proc.log_text())
            if m:
                return m.group(1)
            if not self.proc.alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"the web console did not start:\n{self.proc.log_text()[-2000:]}")

    def _page(self) -> None:
        from websockets.sync.client import connect

        base, token = self.url.split("/?token=")
        with connect(base.replace("http", "ws") + "/ws", additional_headers={"Cookie": f"continua_token={token}"}) as ws:
            while not self._stop.is_set():
                try:
                    ws.recv(timeout=0.5)
                except TimeoutError:
                    continue
                self.counts["page"] += 1

    def _foxglove(self) -> None:
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{self.fox_port}", subprotocols=["foxglove.sdk.v1"],
                     max_size=None) as ws:
            subscribed = False
            while not self._stop.is_set():
                try:
                    msg = ws.recv(timeout=0.5)
                except TimeoutError:
                    continue
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m.get("op") == "advertise" and not subscribed:
                        subs = [{"id": i, "channelId": c["id"]} for i, c in enumerate(m["channels"], start=1)]
                        ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))
                        subscribed = True
                else:
                    self.counts["foxglove"] += 1

    def stop(self) -> dict[str, int]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.proc.stop(10)
        return dict(self.counts)


def browser_figures(url: str, seconds: float, profile: Path) -> dict[str, Any]:
    """Debian's Chromium on this machine: navigation to first prediction, and stamp to page."""
    driver = chrome(profile)
    try:
        driver.get(url)
        end = time.monotonic() + 30
        while time.monotonic() < end and not driver.execute_script("return window.continua && window.continua.firstRenderMs"):
            time.sleep(0.05)
        time.sleep(seconds)
        stats = driver.execute_script("return window.continua")
    finally:
        driver.quit()
    lags = np.asarray(stats["lags"], float)
    return {"first_render_ms": round(float(stats["firstRenderMs"]), 1),
            "stamp_to_page_ms": {"p50": round(float(np.median(lags)), 1), "p99": round(float(np.percentile(lags, 99)), 1),
                                 "max": round(float(lags.max()), 1), "n": int(lags.size)}}


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__.split("\n")[0])
    ap.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--pairs", type=int, default=3, help="off/on phase pairs")
    ap.add_argument("--browser-s", type=float, default=15.0, help="seconds of the local-browser phase (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    print(f"config: {vars(args)}", file=sys.stderr)
    with scratch_dir("continua-web-") as root:
        sensors = Sensors(root)
        agent = None
        try:
            v1 = make_baseline(root, sensors, tasks=1)["v1"]
            agent = Agent(fresh_setup(root, sensors, v1, "web"), tag="web-agent")
            agent.wait_ready(90)
            sub = subscribe(agent.setup.pred_ep)
            collect_predictions(sub, 3.0)  # warm-up
            phases: list[dict[str, Any]] = []
            for _ in range(args.pairs):
                for attached in (False, True):
                    watchers = Watchers(root, agent.setup) if attached else None
                    if watchers is not None:
                        time.sleep(2.0)  # connected and subscribed before measuring
                    drain(sub)  # predictions queued while the watchers started or stopped are not this phase's
                    preds = collect_predictions(sub, args.phase_s)
                    counts = watchers.stop() if watchers is not None else {}
                    phases.append({"attached": attached, "latency_ms": [p["latency_ms"] for p in preds], **counts})
                    print(f"phase {'on ' if attached else 'off'}: {len(preds)} predictions, p99 "
                          f"{_pct(phases[-1]['latency_ms'], 99)} ms {counts}", file=sys.stderr)
            browser: dict[str, Any] = {}
            if args.browser_s > 0:
                watchers = Watchers(root, agent.setup)
                figures: dict[str, Any] = {}
                t = threading.Thread(target=lambda: figures.update(browser_figures(watchers.url, args.browser_s,
                                                                                   root / "chrome")))
                t.start()
                drain(sub)
                preds = collect_predictions(sub, args.browser_s + 3.0)
                t.join()
                watchers.stop()
                browser = {**figures, "serving_p99_ms_with_local_browser": _pct([p["latency_ms"] for p in preds], 99)}
            sub.close(0)
        finally:
            if agent is not None:
                agent.stop()
            sensors.stop()
    off = [x for p in phases if not p["attached"] for x in p["latency_ms"]]
    on = [x for p in phases if p["attached"] for x in p["latency_ms"]]
    res = {"serving_p99_ms": {"off": _pct(off, 99), "on": _pct(on, 99)},
           "serving_p50_ms": {"off": _pct(off, 50), "on": _pct(on, 50)},
           "p99_ratio_on_off": round(_pct(on, 99) / _pct(off, 99), 3),
           # each on phase against the off phase just before it: the spread is the machine's noise
           "pair_p99_ratios": [round(_pct(b["latency_ms"], 99) / _pct(a["latency_ms"], 99), 3)
                               for a, b in zip(phases[::2], phases[1::2], strict=True)],
           "predictions": {"off": len(off), "on": len(on)},
           "phase_p99_ms": [{"attached": p["attached"], "p99": _pct(p["latency_ms"], 99), "page_messages": p.get("page"),
                             "foxglove_messages": p.get("foxglove")} for p in phases],
           **browser,
           "goals": {"first_render_ms": 2000, "stamp_to_page_ms": 200, "p99_ratio_on_off": 1.05}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "web.json").write_text(json.dumps(res, indent=2))
    _plot(phases, args.out)
    report("web", res)
    return 0


def _plot(phases: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [p["latency_ms"] for p in phases]
    ax.boxplot(data, whis=(1, 99), showfliers=False)
    ax.set_xticks(range(1, len(phases) + 1), ["on" if p["attached"] else "off" for p in phases])
    ax.set(ylabel="serving latency (ms), whiskers p1-p99", title="web console + Foxglove attached (on) or not (off)")
    save_figure(fig, "web")


if __name__ == "__main__":
    sys.exit(main())
