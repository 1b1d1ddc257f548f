// continua operator console: one WebSocket in, commands out by POST /api/command.
// Text is written into the DOM as each message arrives; the two canvases redraw on an
// animation frame at most ~10 times a second.
"use strict";

(() => {
  const WINDOW_MS = 30000;      // rolling plot span
  const DRAW_EVERY_MS = 100;    // canvases at most ~10 Hz
  const MODALITIES = ["image", "audio", "imu"];

  const hook = (window.continua = { firstRenderMs: null, lags: [], predictions: 0 });
  const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
  const el = {};
  for (const id of ["connection", "role", "model-version", "latency", "agent-endpoint", "camera",
    "camera-caption", "prediction", "confidence", "smoothed", "unknown", "novelty", "lag", "topk",
    "rolling-plot", "tasks", "classes", "accuracy-matrix", "accuracy-average", "notices", "job-progress",
    "teach-label", "teach-seconds", "teach-button", "teach-error", "learn-name", "learn-labels",
    "learn-source", "learn-button", "learn-error", "control-error"]) el[id] = $(id);
  for (const m of MODALITIES) el[`health-${m}`] = $(`health-${m}`);
  const gate = document.querySelector("fieldset.gate");
  const jobBar = el["job-progress"].querySelector("progress");
  const jobText = el["job-progress"].querySelector(".job-text");

  const st = {
    socketOpen: false, agent: null, role: null,
    history: [],          // [receivedAt (performance.now), confidence, latency_ms]
    camera: null,         // {stamp_ms, width, height}
    tasks: null,          // from the tasks message (null: none yet)
    statusTasks: "",      // status.tasks last written (the fallback before a tasks message)
    myJob: null,          // id of the job this page started last
    matrixDirty: true,
  };

  // ------------------------------------------------------------------ formatting
  const num = (v) => typeof v === "number" && Number.isFinite(v);
  const f2 = (v) => (num(v) ? v.toFixed(2) : "–");
  const ms = (v) => (num(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : "–");
  const secs = (v) => `${v < 1 ? v.toFixed(2) : v.toFixed(1)} s`;
  const setText = (node, text) => { if (node.textContent !== text) node.textContent = text; };

  // ------------------------------------------------------------------ connection
  function showConnection() {
    let text = "disconnected, retrying", state = "disconnected";
    if (st.socketOpen && st.agent && st.agent.connected === false) {
      text = `agent unreachable: ${st.agent.error || "no reply"}`;
      state = "agent-unreachable";
    } else if (st.socketOpen) {
      text = "connected";
      state = "connected";
    }
    setText(el.connection, text);
    el.connection.dataset.state = state;
  }

  let backoff = 500;
  function connect() {
    const url = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "/ws";
    const ws = new WebSocket(url);
    ws.onopen = () => { st.socketOpen = true; backoff = 500; showConnection(); };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { console.warn("bad message", e); return; }
      const fn = HANDLERS[msg && msg.type];
      if (fn) fn(msg);
    };
    ws.onclose = () => {
      st.socketOpen = false;
      showConnection();
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 5000);
    };
    ws.onerror = () => {};  // onclose follows and retries
  }

  // ------------------------------------------------------------------ messages
  function onHello(m) {
    st.role = m.role;
    const viewer = m.role !== "operator";
    setText(el.role, viewer ? "viewer (watch only)" : "operator");
    el.role.dataset.role = m.role || "";
    gate.disabled = viewer;
    document.body.classList.toggle("viewer", viewer);
    setText(el["agent-endpoint"], m.agent || "");
  }

  function onAgent(m) {
    st.agent = m;
    showConnection();
  }

  function onPrediction(m) {
    const p = el.prediction;
    p.textContent = m.label == null ? "none" : String(m.label);
    p.dataset.seq = m.seq;
    p.dataset.stampMs = m.stamp_ms;
    el.confidence.textContent = f2(m.confidence);
    el.smoothed.textContent = `${m.smoothed_label == null ? "none" : m.smoothed_label} (${f2(m.smoothed_confidence)})`;
    el.unknown.textContent = m.unknown ? "unknown" : "known";
    el.unknown.dataset.unknown = m.unknown ? "true" : "false";
    el.novelty.textContent = f2(m.novelty);
    writeTopk(m.topk || []);
    const lag = Date.now() - m.stamp_ms;  // stamp to page, taken once the rest is written
    el.lag.textContent = ms(lag);

    st.history.push([performance.now(), m.confidence, m.latency_ms]);
    if (num(lag)) {
      hook.lags.push(lag);
      if (hook.lags.length > 1000) hook.lags.splice(0, hook.lags.length - 1000);
    }
    hook.predictions += 1;
    if (hook.firstRenderMs === null) hook.firstRenderMs = performance.now();
    schedule();
  }

  function writeTopk(topk) {
    const list = el.topk;
    while (list.children.length < topk.length) {
      const li = document.createElement("li");
      li.innerHTML = '<span class="name"></span><span class="bar"><i></i></span><span class="p"></span>';
      list.appendChild(li);
    }
    while (list.children.length > topk.length) list.lastChild.remove();
    topk.forEach(([label, prob], i) => {
      const li = list.children[i];
      li.children[0].textContent = label;
      li.children[1].firstChild.style.width = `${Math.max(0, Math.min(1, prob)) * 100}%`;
      li.children[2].textContent = f2(prob);
    });
  }

  function onCamera(m) {
    el.camera.src = "data:image/jpeg;base64," + m.jpeg;
    el.camera.alt = `camera frame ${m.width}x${m.height}`;
    st.camera = { stamp_ms: m.stamp_ms, width: m.width, height: m.height };
    writeCameraCaption();
    schedule();
  }

  function writeCameraCaption() {
    const c = st.camera;
    if (!c) return;
    const age = Date.now() - c.stamp_ms;
    setText(el["camera-caption"], `${c.width}×${c.height} · ${num(age) ? (age < 1000 ? ms(age) : secs(age / 1000)) : "?"} old`);
  }

  function onStatus(m) {
    setText(el["model-version"], m.model_version == null ? "–" : `v${m.model_version}`);
    const lat = m.latency_ms || {};
    setText(el.latency, `latency p50 ${ms(lat.p50)} · p99 ${ms(lat.p99)}`);
    const sensors = m.sensors || {};
    for (const mod of MODALITIES) {
      const s = sensors[mod], node = el[`health-${mod}`];
      let text = `${mod}: no data`, healthy = false;
      if (s && num(s.age_s)) {
        healthy = !!s.healthy;
        text = `${mod}: ${healthy ? "fresh" : "stale"} (${secs(s.age_s)})`;
      }
      setText(node, text);
      node.dataset.healthy = String(healthy);
    }
    setText(el.classes, (m.classes || []).join(", ") || "none yet");
    const names = JSON.stringify(m.tasks || []);
    if (st.tasks === null && names !== st.statusTasks) {
      st.statusTasks = names;
      writeTasks((m.tasks || []).map((name) => ({ name, labels: [] })));
    }
    writeNotices(m.notices || []);
    writeJob(m.job);
  }

  function onTasks(m) {
    st.tasks = m.tasks || [];
    writeTasks(st.tasks);
    st.matrixDirty = true;
    schedule();
  }

  function writeTasks(tasks) {
    const list = el.tasks;
    list.replaceChildren(...tasks.map((t) => {
      const li = document.createElement("li");
      li.dataset.task = t.name;
      li.textContent = t.labels && t.labels.length ? `${t.name}: ${t.labels.join(", ")}` : t.name;
      if (num(t.new_task_acc)) li.title = `task ${t.task}, new-task accuracy ${f2(t.new_task_acc)}`;
      return li;
    }));
    if (!tasks.length) list.innerHTML = '<li class="empty">nothing learned yet</li>';
  }

  let lastNotices = "";
  function writeNotices(notices) {
    const key = JSON.stringify(notices);
    if (key === lastNotices) return;
    lastNotices = key;
    el.notices.replaceChildren(...notices.slice().reverse().map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
  }

  // ------------------------------------------------------------------ jobs
  function jobSummary(job) {
    if (job.state === "running") return `${job.name} ${job.phase || ""} ${Math.round((job.progress || 0) * 100)}%`;
    if (job.state === "failed") return `${job.name} failed: ${job.error || "unknown error"}`;
    if (job.state === "cancelled") return `${job.name} cancelled`;
    return `${job.name} ${job.state}: ${shortResult(job.name, job.result || {})}`;
  }

  function shortResult(name, r) {
    if (name === "learn-new-task") {
      const parts = [r.accepted ? "accepted" : "rejected", `new_task_acc ${f2(r.new_task_acc)}`];
      if (r.reason) parts.push(`reason: ${r.reason}`);
      if (r.accepted && r.model_version != null) parts.push(`model v${r.model_version}`);
      return parts.join(", ");
    }
    if (name === "teach") return `${r.samples ?? 0} samples kept for ${r.label ?? "?"}`;
    if (name === "evaluate" && Array.isArray(r.tasks)) {
      return r.tasks.map((t) => `${t.task} ${f2(t.accuracy)}`).join(", ") || "no tasks";
    }
    const text = JSON.stringify(r);
    return text.length > 80 ? text.slice(0, 77) + "…" : text;
  }

  function writeJob(job) {
    // A status from before our command (the previous, finished job) must not hide the one just started.
    if (!job || (st.myJob && job.id !== st.myJob && job.state !== "running")) return;
    if (job.id === st.myJob && job.state !== "running") st.myJob = null;
    const box = el["job-progress"];
    box.dataset.job = job.id;
    box.dataset.state = job.state;
    jobBar.value = job.state === "done" ? 1 : num(job.progress) ? job.progress : 0;
    setText(jobText, jobSummary(job));
  }

  function startedJob(id, name) {
    st.myJob = id;
    const box = el["job-progress"];
    box.dataset.job = id;
    box.dataset.state = "running";
    jobBar.value = 0;
    setText(jobText, `${name} starting 0%`);
  }

  // ------------------------------------------------------------------ commands
  async function command(cmd, args, button, out) {
    button.disabled = true;
    out.classList.remove("error", "ok");
    out.textContent = "…";
    try {
      const resp = await fetch("/api/command", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ cmd, args }),
      });
      const raw = await resp.text();
      let body = null;
      try { body = JSON.parse(raw); } catch (e) { /* 401 and proxies answer plain text */ }
      if (body && body.ok) {
        out.textContent = "";
        const result = body.result || {};
        if (result.job) startedJob(result.job, cmd);
        else { out.textContent = resultText(cmd, result); out.classList.add("ok"); }
      } else {
        const err = (body && body.error) || { code: `http_${resp.status}`, message: raw.trim() || resp.statusText };
        fail(out, `${err.code}: ${err.message}`);
      }
    } catch (e) {
      fail(out, `network: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function fail(out, text) {
    out.textContent = text;
    out.classList.add("error");
  }

  function resultText(cmd, r) {
    if (cmd === "cancel") return r.cancelled ? "cancel requested" : "no job to cancel";
    if (cmd === "rollback") return `rolled back to ${r.checkpoint} (model v${r.model_version})`;
    if (cmd === "save") return `saved ${r.checkpoint} (model v${r.model_version})`;
    return JSON.stringify(r);
  }

  document.querySelector('[data-form="teach"]').addEventListener("submit", (ev) => {
    ev.preventDefault();
    command("teach", { label: el["teach-label"].value.trim(), seconds: parseFloat(el["teach-seconds"].value) },
      el["teach-button"], el["teach-error"]);
  });

  document.querySelector('[data-form="learn"]').addEventListener("submit", (ev) => {
    ev.preventDefault();
    const labels = el["learn-labels"].value.split(",").map((s) => s.trim()).filter((s) => s !== "");
    command("learn-new-task", { name: el["learn-name"].value.trim(), labels, source: el["learn-source"].value.trim() },
      el["learn-button"], el["learn-error"]);
  });

  for (const button of document.querySelectorAll("button[data-cmd]")) {
    button.addEventListener("click", () => command(button.dataset.cmd, {}, button, el["control-error"]));
  }

  // ------------------------------------------------------------------ canvases
  let queued = false, lastDraw = -Infinity;
  function schedule() {
    if (queued) return;
    queued = true;
    const wait = Math.max(0, DRAW_EVERY_MS - (performance.now() - lastDraw));
    setTimeout(() => requestAnimationFrame(frame), wait);
  }

  function frame(now) {
    queued = false;
    lastDraw = now;
    drawPlot(now);
    if (st.matrixDirty) { drawMatrix(); st.matrixDirty = false; }
    writeCameraCaption();
    if (st.history.length || st.camera) schedule();  // keep scrolling (and ageing) while there is data
  }

  function fit(canvas) {  // size the backing store to the CSS box (crisp on HiDPI)
    const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return [ctx, w, h];
  }

  const css = getComputedStyle(document.documentElement);
  const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const C = { conf: color("--conf", "#2563eb"), lat: color("--lat", "#d97706"), grid: "#e5e7eb", ink: "#4b5563" };

  function niceMax(v) {
    if (!(v > 0)) return 10;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    return [1, 2, 5, 10].map((k) => k * p).find((x) => x >= v);
  }

  function drawPlot(now) {
    const h0 = st.history;
    while (h0.length && now - h0[0][0] > WINDOW_MS) h0.shift();
    const [ctx, w, h] = fit(el["rolling-plot"]);
    const L = 34, R = 44, T = 8, B = 18, pw = w - L - R, ph = h - T - B;
    const latMax = niceMax(Math.max(0, ...h0.map((r) => (num(r[2]) ? r[2] : 0))));
    const x = (t) => L + pw * (1 - (now - t) / WINDOW_MS);
    ctx.strokeStyle = C.grid;
    ctx.fillStyle = C.ink;
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = T + ph * (1 - i / 4);
      ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(L + pw, y); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText((i / 4).toFixed(2), L - 4, y);
      ctx.textAlign = "left"; ctx.fillText(String(+(latMax * i / 4).toPrecision(3)), L + pw + 4, y);
    }
    ctx.textBaseline = "top";
    for (let s = 30; s >= 0; s -= 10) {
      ctx.textAlign = s === 30 ? "left" : s === 0 ? "right" : "center";
      ctx.fillText(s ? `-${s} s` : "now", L + pw * (1 - s / 30), T + ph + 4);
    }
    const line = (idx, max, stroke) => {
      ctx.strokeStyle = stroke; ctx.lineWidth = 1.5; ctx.beginPath();
      let pen = false;
      for (const r of h0) {
        if (!num(r[idx])) { pen = false; continue; }
        const px = x(r[0]), py = T + ph * (1 - Math.min(r[idx], max) / max);
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        pen = true;
      }
      ctx.stroke();
    };
    line(2, latMax, C.lat);
    line(1, 1, C.conf);
  }

  function heat(v) {  // 0 -> pale red, 1 -> green
    const hue = Math.round(120 * Math.max(0, Math.min(1, v)));
    return `hsl(${hue} 60% ${88 - 30 * v}%)`;
  }

  function drawMatrix() {
    const tasks = st.tasks || [];
    const [ctx, w, h] = fit(el["accuracy-matrix"]);
    const n = tasks.length;
    if (!n) {
      ctx.fillStyle = C.ink; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText("no tasks learned yet", w / 2, h / 2);
      setText(el["accuracy-average"], "nothing learned yet");
      return;
    }
    const names = tasks.map((t) => String(t.name));
    const left = Math.min(130, 12 + Math.max(...names.map((s, i) => ctx.measureText(`${i}: after ${s}`).width)));
    const top = 18, cw = Math.min((w - left - 4) / n, 80), ch = Math.min((h - top - 4) / n, 48);
    const small = cw < 34 || ch < 16;
    ctx.textAlign = "center"; ctx.textBaseline = "bottom"; ctx.fillStyle = C.ink;
    names.forEach((s, j) => {  // a name that does not fit: the task's index
      const head = ctx.measureText(s).width <= cw - 2 ? s : String(j);
      ctx.fillText(head, left + cw * (j + 0.5), top - 3);
    });
    ctx.textBaseline = "middle";
    tasks.forEach((t, i) => {
      const y = top + ch * i;
      ctx.textAlign = "right"; ctx.fillStyle = C.ink; ctx.font = "11px system-ui, sans-serif";
      ctx.fillText(clip(ctx, `${i}: after ${names[i]}`, left - 6), left - 6, y + ch / 2);
      ctx.textAlign = "center"; ctx.font = `${small ? 9 : 11}px system-ui, sans-serif`;
      for (let j = 0; j < n; j++) {
        const v = (t.accuracy_row || [])[j], cx = left + cw * j;
        ctx.fillStyle = num(v) ? heat(v) : "#f3f4f6";
        ctx.fillRect(cx + 1, y + 1, cw - 2, ch - 2);
        if (num(v) && cw >= 24 && ch >= 11) {
          ctx.fillStyle = "#111827";
          ctx.fillText(v.toFixed(2), cx + cw / 2, y + ch / 2);
        }
      }
    });
    const last = (tasks[n - 1].accuracy_row || []).filter(num);
    const avg = last.length ? last.reduce((a, b) => a + b, 0) / last.length : null;
    setText(el["accuracy-average"],
      avg === null ? "average after the last task: –" : `average after ${names[n - 1]}: ${avg.toFixed(3)} over ${last.length} task${last.length > 1 ? "s" : ""}`);
  }

  function clip(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    while (text.length > 1 && ctx.measureText(text + "…").width > width) text = text.slice(0, -1);
    return text + "…";
  }

  const HANDLERS = { hello: onHello, agent: onAgent, prediction: onPrediction, camera: onCamera,
    status: onStatus, tasks: onTasks };

  window.addEventListener("resize", () => { st.matrixDirty = true; schedule(); });
  writeTasks([]);
  schedule();
  connect();
})();
