// fedmla dashboard page: listens to api/events (server-sent events) and draws the run
// with plotly.js (served by the dashboard itself from the installed plotly package).
// Every number drawn here comes from the JSON API's models; nothing is recomputed.
"use strict";

(function () {
  const token = new URLSearchParams(window.location.search).get("token");
  const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;

  const state = {
    rounds: new Map(),          // id -> RoundView
    clients: [],
    run: null,
    summary: null,
    hiRounds: [],               // rounds with head importance
    hiCache: new Map(),         // round -> HeadImportanceView
    hiSelected: null,           // round shown in the heatmap; null = follow the latest
    version: null,
    updates: 0,
  };
  window.fedmlaDashboard = state;  // for the browser test and for poking around in devtools

  // ---- formatting --------------------------------------------------------------------
  const dash = "–";
  const fmtNum = (x, digits) => (x === null || x === undefined) ? dash : Number(x).toFixed(digits);
  const fmtInt = (x) => (x === null || x === undefined) ? dash : Number(x).toLocaleString("en-US");
  function fmtBytes(n) {
    if (n === null || n === undefined) return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? `${n} B` : `${v.toFixed(2)} ${units[i]}`;
  }
  const fmtRatio = (x) => (x === null || x === undefined) ? dash : `${x.toFixed(1)}×`;
  function fmtSeconds(s) {
    if (s === null || s === undefined) return dash;
    if (s < 60) return `${s.toFixed(2)} s`;
    const m = Math.floor(s / 60);
    return `${m} min ${Math.round(s - 60 * m)} s`;
  }
  function fmtAgo(ts) {
    if (ts === null || ts === undefined) return dash;
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return new Date(ts * 1000).toLocaleString();
  }
  const fmtTime = (ts) => (ts === null || ts === undefined) ? "" : new Date(ts * 1000).toISOString();
  const el = (id) => document.getElementById(id);
  function setText(id, text, title) {
    const node = el(id);
    node.textContent = text;
    if (title !== undefined) node.title = title;
  }
  function cell(row, text, opts = {}) {
    const td = document.createElement("td");
    td.textContent = text;
    if (opts.num) td.className = "num";
    if (opts.cls) td.className = opts.cls;
    if (opts.title) td.title = opts.title;
    if (opts.value !== undefined && opts.value !== null) td.dataset.value = String(opts.value);
    if (opts.key) td.dataset.key = opts.key;
    row.appendChild(td);
    return td;
  }
  const statusClass = (s) => "status-" + String(s || "").toLowerCase().replace(/[^a-z0-9_-]/g, "");

  // ---- charts --------------------------------------------------------------------------
  const plotConfig = { displaylogo: false, responsive: true };
  const baseLayout = (extra) => Object.assign({
    margin: { l: 60, r: 60, t: 10, b: 70 },
    xaxis: { title: { text: "round", standoff: 4 }, tickformat: "d" },
    legend: { orientation: "h", y: -0.32 },
    hovermode: "x unified",
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
  }, extra);

  // Byte counts span orders of magnitude (the point of the comparison): log axis, one tick per decade.
  const logBytes = { type: "log", dtick: 1, tickformat: "~s" };

  function drawCharts(rounds) {
    const x = rounds.map((r) => r.id);
    const xaxis = { title: { text: "round", standoff: 4 }, tickformat: "d", dtick: rounds.length <= 15 ? 1 : undefined };
    const layout = (extra) => baseLayout(Object.assign({ xaxis }, extra));
    const col = (k) => rounds.map((r) => r[k]);
    Plotly.react("chart-loss", [
      { x, y: col("train_loss"), name: "training loss", mode: "lines+markers", type: "scatter" },
      { x, y: col("val_loss"), name: "validation loss", mode: "lines+markers", type: "scatter" },
    ], layout({ yaxis: { title: { text: "nats / token" } } }), plotConfig);

    Plotly.react("chart-perplexity", [
      { x, y: col("train_perplexity"), name: "training perplexity", mode: "lines+markers", type: "scatter" },
      { x, y: col("val_perplexity"), name: "validation perplexity", mode: "lines+markers", type: "scatter" },
    ], layout({ yaxis: { title: { text: "perplexity" } } }), plotConfig);

    Plotly.react("chart-clients", [
      { x, y: col("replied"), name: "replied", type: "bar", marker: { color: "#12805c" } },
      { x, y: col("dropped"), name: "dropped", type: "bar", marker: { color: "#f79009" } },
      { x, y: col("rejected"), name: "rejected", type: "bar", marker: { color: "#b42318" } },
      { x, y: col("sampled"), name: "sampled", mode: "lines+markers", type: "scatter", line: { color: "#1d2330", dash: "dot" } },
    ], layout({ barmode: "stack", yaxis: { title: { text: "clients" }, tickformat: "d", rangemode: "tozero" } }), plotConfig);

    Plotly.react("chart-duration", [
      { x, y: col("duration_seconds"), name: "round duration", type: "bar", marker: { color: "#2f6fdf" } },
      { x, y: col("aggregation_seconds"), name: "aggregation", mode: "lines+markers", type: "scatter", line: { color: "#b54708" } },
    ], layout({ yaxis: { title: { text: "seconds" }, rangemode: "tozero" } }), plotConfig);

    Plotly.react("chart-bytes", [
      { x, y: col("bytes_up"), name: "up (clients → coordinator)", type: "bar" },
      { x, y: col("bytes_down"), name: "down (coordinator → clients)", type: "bar" },
      { x, y: col("fedavg_fp32_bytes"), name: "FedAvg fp32 would send up", mode: "lines+markers", type: "scatter", line: { dash: "dash", color: "#667085" } },
    ], layout({ barmode: "group", yaxis: Object.assign({ title: { text: "bytes" } }, logBytes) }), plotConfig);

    Plotly.react("chart-cumulative", [
      { x, y: col("cum_bytes_up"), name: "fedmla up", mode: "lines+markers", type: "scatter", line: { color: "#1f77b4" } },
      { x, y: col("cum_bytes_total"), name: "fedmla up + down", mode: "lines", type: "scatter", line: { color: "#1f77b4", dash: "dot" } },
      { x, y: col("cum_fedavg_fp32_bytes"), name: "FedAvg fp32 up", mode: "lines+markers", type: "scatter", line: { dash: "dash", color: "#667085" } },
      { x, y: col("cum_fedavg_fp32_bytes_total"), name: "FedAvg fp32 up + down", mode: "lines", type: "scatter", line: { dash: "dot", color: "#667085" } },
      { x, y: col("cum_total_fedavg_ratio"), name: "running ratio, up + down (×)", mode: "lines+markers", type: "scatter", yaxis: "y2", line: { color: "#12805c" } },
      { x, y: col("cum_fedavg_ratio"), name: "running ratio, up only (×)", mode: "lines", type: "scatter", yaxis: "y2", line: { color: "#12805c", dash: "dot" } },
    ], layout({
      yaxis: Object.assign({ title: { text: "bytes" } }, logBytes),
      yaxis2: { title: { text: "FedAvg fp32 bytes / fedmla bytes" }, overlaying: "y", side: "right", rangemode: "tozero",
                tickmode: "auto", showgrid: false },
    }), plotConfig);
  }

  function drawHeatmap(h) {
    const div = "chart-heatmap";
    if (!h) {
      Plotly.react(div, [], { annotations: [{ text: "no head importance recorded yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }],
        xaxis: { visible: false }, yaxis: { visible: false }, margin: { l: 10, r: 10, t: 10, b: 10 } }, plotConfig);
      setText("heat-caption", "");
      return;
    }
    const heads = Array.from({ length: h.n_heads }, (_, i) => `head ${i}`);
    const layers = Array.from({ length: h.n_layers }, (_, i) => `layer ${i}`);
    const z = h.scores.map((row) => { const r = row.slice(); while (r.length < h.n_heads) r.push(null); return r; });
    const traces = [{
      type: "heatmap", z, x: heads, y: layers, colorscale: "Viridis", name: "importance",
      texttemplate: "%{z:.3f}", hovertemplate: "%{y}, %{x}<br>importance %{z:.4f}<extra></extra>",
      colorbar: { title: { text: "importance" } }, xgap: 2, ygap: 2,
    }];
    const offX = [], offY = [];
    if (h.mask) {
      h.mask.forEach((row, l) => row.forEach((active, k) => { if (!active) { offX.push(heads[k]); offY.push(layers[l]); } }));
    }
    traces.push({
      type: "scatter", mode: "markers", x: offX, y: offY, name: "inactive head (masked)", hoverinfo: "skip",
      marker: { symbol: "x-thin", size: 22, line: { width: 3, color: "#ff4d4f" } }, showlegend: true,
    });
    Plotly.react(div, traces, {
      margin: { l: 70, r: 20, t: 10, b: 40 }, yaxis: { autorange: "reversed" },
      legend: { orientation: "h", y: -0.15 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    }, plotConfig);
    const caption = h.active_heads === null ? "no active-head mask recorded" : `${h.active_heads} of ${h.scores.reduce((a, r) => a + r.length, 0)} heads active`;
    setText("heat-caption", `— after round ${h.round_id}, ${caption}`);
  }

  async function showHeatmapRound(roundId) {
    let h = state.hiCache.get(roundId);
    if (!h) {
      const resp = await fetch(withToken(`api/head-importance/${roundId}`));
      if (!resp.ok) { showError(`head importance of round ${roundId}: ${await errorText(resp)}`); return; }
      h = await resp.json();
      state.hiCache.set(roundId, h);
    }
    setText("heat-round", String(roundId));
    drawHeatmap(h);
  }

  function updateSlider(latest) {
    const slider = el("heat-slider");
    const n = state.hiRounds.length;
    if (latest) state.hiCache.set(latest.round_id, latest);  // the latest may still be rewritten
    if (n === 0) { slider.disabled = true; setText("heat-round", dash); drawHeatmap(null); return; }
    slider.disabled = n < 2;
    slider.max = String(n - 1);
    const follow = state.hiSelected === null || !state.hiRounds.includes(state.hiSelected);
    const shown = follow ? state.hiRounds[n - 1] : state.hiSelected;
    slider.value = String(state.hiRounds.indexOf(shown));
    showHeatmapRound(shown);
  }

  el("heat-slider").addEventListener("input", (ev) => {
    const idx = Number(ev.target.value);
    const r = state.hiRounds[idx];
    state.hiSelected = idx === state.hiRounds.length - 1 ? null : r;  // back at the end: follow again
    showHeatmapRound(r);
  });

  // ---- tables, cards, run ------------------------------------------------------------
  function drawRoundsTable(rounds) {
    const body = el("rounds-body");
    body.replaceChildren();
    for (const r of rounds.slice().reverse()) {
      const tr = document.createElement("tr");
      tr.dataset.round = String(r.id);
      cell(tr, String(r.id), { num: true, key: "id" });
      cell(tr, r.status, { cls: statusClass(r.status), key: "status" });
      cell(tr, fmtNum(r.val_loss, 4), { num: true, value: r.val_loss, key: "val_loss" });
      cell(tr, fmtNum(r.train_loss, 4), { num: true, value: r.train_loss, key: "train_loss" });
      cell(tr, String(r.sampled), { num: true, key: "sampled" });
      cell(tr, String(r.replied), { num: true, key: "replied" });
      cell(tr, String(r.dropped), { num: true, key: "dropped" });
      cell(tr, String(r.rejected), { num: true, key: "rejected" });
      cell(tr, fmtSeconds(r.duration_seconds), { num: true, value: r.duration_seconds, key: "duration_seconds" });
      cell(tr, fmtBytes(r.bytes_up), { num: true, value: r.bytes_up, title: `${fmtInt(r.bytes_up)} bytes`, key: "bytes_up" });
      cell(tr, fmtBytes(r.bytes_down), { num: true, value: r.bytes_down, title: `${fmtInt(r.bytes_down)} bytes`, key: "bytes_down" });
      cell(tr, fmtBytes(r.fedavg_fp32_bytes), { num: true, value: r.fedavg_fp32_bytes, title: `${fmtInt(r.fedavg_fp32_bytes)} bytes`, key: "fedavg_fp32_bytes" });
      cell(tr, fmtRatio(r.fedavg_ratio), { num: true, value: r.fedavg_ratio, key: "fedavg_ratio" });
      cell(tr, r.reason || "", { cls: "reason", key: "reason" });
      body.appendChild(tr);
    }
  }

  function drawClientsTable(clients) {
    const body = el("clients-body");
    body.replaceChildren();
    for (const c of clients) {
      const tr = document.createElement("tr");
      tr.dataset.client = c.name;
      cell(tr, c.name, { key: "name" });
      cell(tr, c.status, { cls: statusClass(c.status), key: "status" });
      const seen = cell(tr, fmtAgo(c.last_seen), { title: fmtTime(c.last_seen), value: c.last_seen, key: "last_seen" });
      seen.classList.add("ago");
      cell(tr, String(c.rounds_joined), { num: true, key: "rounds_joined" });
      cell(tr, fmtBytes(c.bytes_up), { num: true, value: c.bytes_up, title: `${fmtInt(c.bytes_up)} bytes`, key: "bytes_up" });
      cell(tr, fmtBytes(c.bytes_down), { num: true, value: c.bytes_down, title: `${fmtInt(c.bytes_down)} bytes`, key: "bytes_down" });
      cell(tr, c.last_round === null ? dash : String(c.last_round), { num: true, key: "last_round" });
      cell(tr, fmtNum(c.local_loss, 4), { num: true, value: c.local_loss, key: "local_loss" });
      cell(tr, c.num_examples === null ? dash : fmtInt(c.num_examples), { num: true, value: c.num_examples, key: "num_examples" });
      cell(tr, c.rejection_reason || "", { cls: "rejection", key: "rejection_reason" });
      body.appendChild(tr);
    }
  }

  function drawCards(s) {
    setText("card-round", s.current_round === null ? dash : String(s.current_round));
    setText("card-round-status", s.current_status ? `${s.current_status} · ${s.rounds_ended} ended` : "");
    setText("card-val-loss", fmtNum(s.last_val_loss, 4));
    setText("card-best-val", s.best_val_loss === null ? "" : `best ${fmtNum(s.best_val_loss, 4)}`);
    setText("card-val-ppl", fmtNum(s.last_val_perplexity, 2));
    setText("card-train-loss", fmtNum(s.last_train_loss, 4));
    setText("card-bytes", `${fmtBytes(s.cum_bytes_up)} / ${fmtBytes(s.cum_bytes_down)}`,
      `${fmtInt(s.cum_bytes_up)} bytes up, ${fmtInt(s.cum_bytes_down)} bytes down`);
    setText("card-bytes-sub", `total ${fmtBytes(s.cum_bytes_up + s.cum_bytes_down)}`);
    setText("card-ratio", fmtRatio(s.cum_total_fedavg_ratio));
    setText("card-ratio-up", s.cum_fedavg_ratio === null ? "" : `up only: ${fmtRatio(s.cum_fedavg_ratio)}`);
    setText("card-fedavg", s.cum_fedavg_fp32_bytes_total === null ? "" : `FedAvg fp32: ${fmtBytes(s.cum_fedavg_fp32_bytes_total)}`);
    setText("card-clients", String(s.clients_total));
    setText("card-clients-sub", Object.entries(s.clients_by_status).map(([k, v]) => `${v} ${k}`).join(", "));
  }

  function drawRun(run) {
    setText("run-id", run.run_id);
    el("run-config").textContent = JSON.stringify(run.config, null, 2);
    el("model-config").textContent = run.mla_config ? JSON.stringify(run.mla_config, null, 2) : "not recorded";
    const dl = el("model-summary");
    dl.replaceChildren();
    const add = (k, v, key) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v; if (key) dd.dataset.key = key;
      dl.append(dt, dd);
    };
    const m = run.model;
    if (m) {
      add("parameters", fmtInt(m.parameters), "parameters");
      add("KV-cache bytes / token", `${fmtInt(m.kv_cache_bytes_per_token)} (${m.element_size} B per element)`, "kv_cache_bytes_per_token");
      add("same model with MHA", `${fmtInt(m.mha_parameters)} parameters, ${fmtInt(m.mha_kv_cache_bytes_per_token)} KV bytes / token`);
      add("KV cache, MLA / MHA", fmtNum(m.kv_cache_ratio, 3));
      add("layers × heads", `${m.n_layers} × ${m.n_heads}`);
      add("width, latent rank", `${m.dim}, ${m.kv_lora_rank}`);
    } else {
      add(run.model_error || "no model config in this run", "");
    }
    const pv = run.privacy;
    if (pv) {
      add("privacy spent (ε at δ)", `${fmtNum(pv.epsilon, 3)} of ${fmtNum(pv.target_epsilon, 3)} at δ = ${pv.delta}` +
          ` after ${pv.rounds} DP round${pv.rounds === 1 ? "" : "s"}${pv.exhausted ? " — budget reached, no more rounds" : ""}`,
          "privacy");
    }
    add("schema version", run.schema_version === null ? dash : String(run.schema_version));
    add("created", run.created_at === null ? dash : fmtTime(run.created_at));
  }

  // ---- live updates --------------------------------------------------------------------
  function apply(update) {
    if (update.full) state.rounds.clear();
    for (const id of Array.from(state.rounds.keys())) if (id >= update.rounds_from) state.rounds.delete(id);
    for (const r of update.rounds) state.rounds.set(r.id, r);
    state.clients = update.clients;
    state.run = update.run;
    state.summary = update.summary;
    state.hiRounds = update.head_importance_rounds;
    state.version = update.version;
    state.updates += 1;

    const rounds = Array.from(state.rounds.values()).sort((a, b) => a.id - b.id);
    drawCards(update.summary);
    drawCharts(rounds);
    drawRoundsTable(rounds);
    drawClientsTable(update.clients);
    drawRun(update.run);
    updateSlider(update.head_importance);
    document.body.dataset.version = String(update.version);
    setText("last-update", `updated ${new Date().toLocaleTimeString()}`);
    hideError();
  }

  function showError(text) { const e = el("error"); e.textContent = text; e.style.display = "block"; }
  function hideError() { el("error").style.display = "none"; }
  async function errorText(resp) {
    try { const j = await resp.json(); return j.detail || resp.statusText; } catch (_) { return `${resp.status} ${resp.statusText}`; }
  }
  function setStatus(text, cls) { const p = el("conn-status"); p.textContent = text; p.className = "pill " + (cls || ""); }

  function connect() {
    const source = new EventSource(withToken("api/events"));
    source.addEventListener("open", () => setStatus("live", "live"));
    source.addEventListener("update", (ev) => {
      try { apply(JSON.parse(ev.data)); } catch (err) { showError(`could not draw an update: ${err}`); console.error(err); }
    });
    source.addEventListener("error", async () => {
      setStatus("disconnected — retrying", "down");
      // EventSource hides the HTTP status; ask the API why (wrong token, store gone, server down).
      try {
        const resp = await fetch(withToken("api/health"));
        if (!resp.ok) showError(`dashboard API: ${await errorText(resp)}`);
      } catch (_) { showError("the dashboard server is not reachable; retrying"); }
    });
  }

  el("api-link").href = withToken("openapi.json");
  setInterval(() => {
    for (const td of document.querySelectorAll("td.ago")) {
      const ts = td.dataset.value;
      if (ts !== undefined) td.textContent = fmtAgo(Number(ts));
    }
  }, 1000);
  if (typeof Plotly === "undefined") {
    showError("plotly.js did not load from static/plotly.min.js");
  } else {
    connect();
  }
})();
