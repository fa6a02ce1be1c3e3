// smolora-serve operator console: plain JavaScript, no build step, no third-party code.
//
// Talks only to this server: POST v1/chat/completions (streamed, with the `smolora` routing
// trace), GET v1/models, GET ready, the admin endpoints admin/checkpoints/*, and the two
// read-only views console/api/metrics and console/api/versions. Paths are relative to the
// page (served at /console), so the console works behind a path prefix too.
// Keys typed into the page live in the `keys` object below and nowhere else (no storage).
"use strict";

(() => {
  const POLL_MS = 2000;
  const HISTORY_S = 600; // how much of the timeline the chart keeps
  const keys = { api: "", admin: "" };
  const state = {
    servedName: null,
    cards: [],
    versions: null,
    versionsKey: "",
    image: null, // {dataUrl, name}
    results: { A: null, B: null },
    history: [], // {t, ttft, e2e, tput}
    events: new Map(), // key -> {t, label, kind}
    lastMetrics: null,
    lastActive: undefined,
    running: { A: false, B: false },
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else if (k in node) node[k] = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // ---------------------------------------------------------------- HTTP and errors
  class ApiError extends Error {
    constructor(message, status, code, param) {
      super(message);
      this.status = status;
      this.code = code || null;
      this.param = param || null;
    }
  }

  function keyHint(status, admin) {
    if (status === 401) {
      return admin
        ? " Type the server's admin key in the Admin key field at the top."
        : " Type a valid API key in the API key field at the top.";
    }
    if (status === 403 && admin) return " This server has no admin key configured.";
    return "";
  }

  function errorFrom(status, data, text, admin) {
    if (data && typeof data === "object" && data.error) {
      const e = data.error;
      const where = e.param ? ` (field: ${e.param})` : "";
      const head = `HTTP ${status}${e.code ? " · " + e.code : ""}`;
      return new ApiError(`${head}: ${e.message}${where}.${keyHint(status, admin)}`, status, e.code, e.param);
    }
    if (data && typeof data === "object" && data.reason) {
      return new ApiError(`HTTP ${status}: ${data.reason}`, status, data.status);
    }
    const snippet = (text || "").trim().slice(0, 300) || "no details in the response";
    return new ApiError(`HTTP ${status}: ${snippet}${keyHint(status, admin)}`, status);
  }

  function headers(admin, hasBody) {
    const h = {};
    const key = admin ? keys.admin : keys.api;
    if (key) h.Authorization = "Bearer " + key;
    if (hasBody) h["Content-Type"] = "application/json";
    return h;
  }

  async function send(path, { method = "GET", body, admin = false } = {}) {
    try {
      return await fetch(path, {
        method,
        headers: headers(admin, body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiError(`cannot reach the server (${e.message}); is it running?`, 0, "network_error");
    }
  }

  async function getJSON(path, opts) {
    const resp = await send(path, opts);
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) throw errorFrom(resp.status, data, text, opts && opts.admin);
    return data;
  }

  function showMessage(node, text, kind) {
    if (!text) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    node.hidden = false;
    node.textContent = text;
    node.className = "message " + (kind || "error");
  }

  // ---------------------------------------------------------------- formatting
  function fmtSeconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
    return `${s.toFixed(2)} s`;
  }

  function fmtNumber(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    return Number(x.toPrecision(digits)).toString();
  }

  function fmtTime(unix) {
    if (!unix) return "";
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  }

  // ---------------------------------------------------------------- server status, models
  async function refreshReady() {
    const pill = $("server-status");
    try {
      const resp = await send("ready");
      const data = await resp.json().catch(() => ({}));
      if (resp.ok) {
        const active = data.active_version ? ` · active v${data.active_version}` : "";
        pill.textContent = `ready · ${data.model}${data.adapters === false ? " (base model)" : active}`;
        pill.className = "pill ok";
      } else {
        pill.textContent = `not ready: ${data.reason || "HTTP " + resp.status}`;
        pill.className = "pill warn";
      }
    } catch (e) {
      pill.textContent = "server unreachable";
      pill.className = "pill bad";
    }
  }

  async function refreshModels() {
    const cards = (await getJSON("v1/models")).data;
    state.cards = cards;
    const root = cards.find((c) => !c.parent);
    state.servedName = root ? root.id : null;
    const select = $("version");
    const chosen = select.value;
    const wanted = [["", "active version"]];
    for (const c of cards.filter((c) => c.parent)) {
      const s = c.smolora || {};
      const tasks = (s.tasks || []).join(", ");
      wanted.push([String(s.version), `v${s.version} ${s.name || ""}${s.active ? " (active)" : ""} · ${tasks}`]);
    }
    const current = [...select.options].map((o) => [o.value, o.textContent]);
    if (JSON.stringify(current) !== JSON.stringify(wanted)) {
      select.replaceChildren(...wanted.map(([v, t]) => el("option", { value: v, text: t })));
      select.value = wanted.some(([v]) => v === chosen) ? chosen : "";
    }
    refreshInstructionTypes();
  }

  function selectedCard() {
    const v = $("version").value;
    const versionCards = state.cards.filter((c) => c.parent);
    if (v) return versionCards.find((c) => String(c.smolora.version) === v);
    return versionCards.find((c) => c.smolora && c.smolora.active);
  }

  function refreshInstructionTypes() {
    const card = selectedCard();
    const types = (card && card.smolora.instruction_types) || [];
    const select = $("instruction-type");
    const chosen = select.value;
    const current = [...select.options].map((o) => o.value);
    if (JSON.stringify(current) !== JSON.stringify(types)) {
      select.replaceChildren(...types.map((t) => el("option", { value: t, text: t })));
      if (types.includes(chosen)) select.value = chosen;
    }
  }

  // ---------------------------------------------------------------- image input
  function setImage(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      state.image = { dataUrl: String(reader.result), name: file.name || "pasted image" };
      const img = $("image-preview");
      img.src = state.image.dataUrl;
      img.hidden = false;
      $("image-name").textContent = `${state.image.name} (${Math.round(file.size / 1024)} KiB)`;
      $("drop").classList.add("has-image");
    };
    reader.onerror = () => {
      state.image = null;
      $("image-name").textContent = `could not read ${file.name}`;
    };
    reader.readAsDataURL(file);
  }

  function wireImageInput() {
    const drop = $("drop");
    $("image-file").addEventListener("change", (e) => setImage(e.target.files[0]));
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
      if (item) setImage(item.getAsFile());
    });
  }

  // ---------------------------------------------------------------- try a request
  function buildRequest() {
    const question = $("question").value;
    const mode = $("instruction-mode").value;
    const ext = { trace: true };
    let how = "instruction extracted from the question";
    if (mode === "type") {
      ext.instruction_type = $("instruction-type").value;
      how = `instruction type ${ext.instruction_type}`;
    } else if (mode === "text") {
      ext.instruction = $("instruction-text").value;
      how = `instruction "${ext.instruction}"`;
    }
    const version = $("version").value;
    const body = {
      model: version ? `${state.servedName}@${version}` : state.servedName,
      messages: [
        {
          role: "user",
          content: [
            { type: "image_url", image_url: { url: state.image.dataUrl } },
            { type: "text", text: question },
          ],
        },
      ],
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value),
      smolora: ext,
    };
    return { body, how, version: version ? `v${version}` : "active version" };
  }

  function resultSkeleton(slot, req) {
    const card = $("result-" + slot);
    const answer = el("pre", { class: "answer", "data-chunks": 0, "aria-live": "polite" });
    const status = el("span", { class: "status running", text: "streaming…" });
    card.replaceChildren(
      el(
        "header",
        { class: "result-head" },
        el("strong", { class: "slot", text: slot }),
        el("span", { class: "model", text: req.body.model || "" }),
        status,
      ),
      el("p", { class: "request-line muted", text: `${state.image.name} · ${req.version} · ${req.how}` }),
      answer,
    );
    card.dataset.state = "streaming";
    return { card, answer, status };
  }

  async function runRequest(slot) {
    const card = $("result-" + slot);
    if (!state.image) {
      card.dataset.state = "error";
      card.replaceChildren(el("p", { class: "message error", text: "Choose an image first: drop, paste or pick a file." }));
      return;
    }
    if (!state.servedName) {
      try {
        await refreshModels();
      } catch (e) {
        card.dataset.state = "error";
        card.replaceChildren(el("p", { class: "message error", text: `The model list could not be read. ${e.message}` }));
        return;
      }
    }
    if (state.running[slot]) return;
    state.running[slot] = true;
    const req = buildRequest();
    const view = resultSkeleton(slot, req);
    const result = { slot, req, text: "", chunks: 0, ext: null, finish: null, usage: null, ttft: null, total: null, model: null, error: null };
    state.results[slot] = null;
    renderCompare();
    const t0 = performance.now();
    try {
      const resp = await send("v1/chat/completions", { method: "POST", body: req.body });
      if (!resp.ok) {
        const text = await resp.text();
        let data = null;
        try {
          data = JSON.parse(text);
        } catch (_) {
          data = null;
        }
        throw errorFrom(resp.status, data, text, false);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const payload = line.slice(5).trim();
            if (!payload || payload === "[DONE]") continue;
            const msg = JSON.parse(payload);
            if (msg.error) throw errorFrom(msg.error.code === "not_ready" ? 503 : 500, msg, payload, false);
            result.model = msg.model || result.model;
            for (const c of msg.choices || []) {
              const piece = c.delta && c.delta.content;
              if (piece) {
                if (result.ttft === null) result.ttft = (performance.now() - t0) / 1000;
                result.text += piece;
                result.chunks += 1;
                view.answer.textContent = result.text;
                view.answer.dataset.chunks = result.chunks;
              }
              if (c.finish_reason) result.finish = c.finish_reason;
            }
            if (msg.usage) result.usage = msg.usage;
            if (msg.smolora) result.ext = msg.smolora;
          }
        }
      }
      result.total = (performance.now() - t0) / 1000;
    } catch (e) {
      result.error = e instanceof ApiError ? e.message : `the response could not be read (${e.message})`;
    } finally {
      state.running[slot] = false;
    }
    state.results[slot] = result;
    renderResult(slot);
    renderCompare();
  }

  function numExpertsFor(ext, layers) {
    const v = ext && ext.version;
    const known = state.versions && state.versions.versions.find((x) => x.version === v);
    if (known && known.num_experts) return known.num_experts;
    // Fallback: the smallest even count the chosen ids fit in (VU ids < E/2 <= IF ids < E).
    let maxVu = 0;
    let maxIf = 0;
    for (const l of layers) {
      maxVu = Math.max(maxVu, l.vu_expert);
      maxIf = Math.max(maxIf, l.if_expert);
    }
    return Math.max(2 * (maxVu + 1), maxIf + 1 + ((maxIf + 1) % 2));
  }

  function renderResult(slot) {
    const r = state.results[slot];
    const card = $("result-" + slot);
    const head = el(
      "header",
      { class: "result-head" },
      el("strong", { class: "slot", text: slot }),
      el("span", { class: "model", text: r.model || r.req.body.model || "" }),
      el("span", { class: "status " + (r.error ? "failed" : "done"), text: r.error ? "failed" : `done · ${r.finish || "?"}` }),
    );
    const line = el("p", { class: "request-line muted", text: `${state.image ? state.image.name : ""} · ${r.req.version} · ${r.req.how}` });
    const answer = el("pre", { class: "answer", "data-chunks": r.chunks, text: r.text });
    const parts = [head, line];
    if (r.error) {
      parts.push(el("p", { class: "message error request-error", role: "alert", text: r.error }));
      if (r.text) parts.push(answer);
      card.dataset.state = "error";
      card.replaceChildren(...parts);
      return;
    }
    parts.push(answer);
    const ext = r.ext || {};
    const meta = el("dl", { class: "meta" });
    const add = (k, v) => meta.append(el("dt", { text: k }), el("dd", { text: v }));
    const ins = ext.instruction;
    if (ins) {
      const bits = [ins.source];
      if (ins.type) bits.push(`type ${ins.type}`);
      if (ins.similarity !== undefined && ins.similarity !== null) bits.push(`similarity ${fmtNumber(ins.similarity)}`);
      if (ins.threshold !== undefined && ins.threshold !== null) bits.push(`threshold ${ins.threshold}`);
      add("instruction", bits.join(" · "));
      if (ins.text) add("routed by", ins.text);
      if (ins.extracted_text && ins.extracted_text !== ins.text) add("extracted", ins.extracted_text);
    } else if (ext.adapters === false) {
      add("adapters", "off (base model): no routing");
    }
    if (ext.version) add("version", `v${ext.version} ${ext.version_name || ""}`);
    if (r.usage) add("tokens", `${r.usage.prompt_tokens} prompt · ${r.usage.completion_tokens} generated`);
    add("time", `first token ${fmtSeconds(r.ttft)} · total ${fmtSeconds(r.total)} (in the browser)`);
    parts.push(meta);
    const trace = ext.trace && ext.trace[0];
    if (trace && trace.layers.length) {
      const other = state.results[slot === "A" ? "B" : "A"];
      const otherLayers = other && !other.error && other.ext && other.ext.trace ? other.ext.trace[0].layers : null;
      parts.push(routeGrid(trace.layers, numExpertsFor(ext, trace.layers), otherLayers, trace.vu_routing));
    } else if (ext.adapters !== false) {
      parts.push(el("p", { class: "muted", text: "No routing trace in the response." }));
    }
    parts.push(el("details", {}, el("summary", { text: "response smolora object (JSON)" }), el("pre", { class: "raw", text: JSON.stringify(ext, null, 1) })));
    card.dataset.state = "done";
    card.replaceChildren(...parts);
  }

  // "layers.0.mlp.gate_proj" -> "L0 mlp.gate", "projector.linear_1" -> "proj.linear_1" (full name on hover).
  function shortLayer(name) {
    return name.replace(/^(?:model\.)?layers\.(\d+)\./, "L$1 ").replace(/^projector\./, "proj.").replace(/_proj$/, "");
  }

  function routeGrid(layers, numExperts, otherLayers, vuRouting) {
    const half = Math.floor(numExperts / 2);
    const compact = numExperts > 8; // narrow cells, weights only as shading and in the tooltips
    const other = new Map((otherLayers || []).map((l) => [l.layer, l]));
    const table = el("table", { class: "route-grid" + (compact ? " compact" : ""), "data-layers": layers.length, "data-experts": numExperts });
    const top = el(
      "tr",
      {},
      el("th", { rowSpan: 2, class: "layer-col", text: "layer" }),
      el("th", { colSpan: half, class: "vu group", text: compact ? "VU (image)" : "VU experts (image)" }),
      el("th", { colSpan: numExperts - half, class: "if group", text: compact ? "IF (instruction)" : "IF experts (instruction)" }),
      compact ? null : el("th", { rowSpan: 2, class: "fusion-col", text: "w_vu : w_if" }),
    );
    const ids = el("tr", {});
    for (let e = 0; e < numExperts; e++) ids.append(el("th", { class: e < half ? "vu id" : "if id", text: e }));
    table.append(el("thead", {}, top, ids));
    const body = el("tbody");
    for (const l of layers) {
      const o = other.get(l.layer);
      const row = el("tr", { "data-layer": l.layer, "data-vu": l.vu_expert, "data-if": l.if_expert });
      row.append(el("th", { class: "layer-name", title: l.layer, text: shortLayer(l.layer) }));
      for (let e = 0; e < numExperts; e++) {
        const kind = e < half ? "vu" : "if";
        const td = el("td", { class: "cell " + kind, "data-expert": e });
        const chosen = kind === "vu" ? l.vu_expert === e : l.if_expert === e;
        if (chosen) {
          const w = kind === "vu" ? l.w_vu : l.w_if;
          td.classList.add("chosen");
          td.dataset.w = w.toFixed(2);
          if (!compact) td.textContent = w.toFixed(2);
          td.title = `${l.layer}: ${kind.toUpperCase()} expert ${e}, mean fusion weight ${w.toFixed(3)}`;
          td.style.backgroundColor = kind === "vu" ? `rgba(20, 110, 190, ${0.15 + 0.85 * w})` : `rgba(225, 110, 20, ${0.15 + 0.85 * w})`;
          if (w > 0.55) td.classList.add("strong");
          if (o && (kind === "vu" ? o.vu_expert !== e : o.if_expert !== e)) td.classList.add("diff");
        }
        row.append(td);
      }
      const bar = el("span", { class: "fusion-bar" }, el("span", { class: "vu-part" }), el("span", { class: "if-part" }));
      bar.firstChild.style.width = `${(100 * l.w_vu).toFixed(1)}%`;
      bar.lastChild.style.width = `${(100 * l.w_if).toFixed(1)}%`;
      const weights = el("span", { class: "fusion-text", text: `${l.w_vu.toFixed(2)} : ${l.w_if.toFixed(2)}` });
      if (!compact) row.append(el("td", { class: "fusion", title: `w_vu ${l.w_vu.toFixed(3)} · w_if ${l.w_if.toFixed(3)}` }, weights, bar));
      body.append(row);
    }
    table.append(body);
    const caption = `${layers.length} layers × ${numExperts} experts · VU route ${vuRouting || "pinned"} · shading = mean fusion weight${otherLayers ? " · outlined = differs from the other request" : ""}`;
    return el("div", { class: "grid-box" }, el("p", { class: "grid-caption muted", text: caption }), el("div", { class: "scroll-x grid-scroll" }, table));
  }

  function renderCompare() {
    const box = $("compare-summary");
    const a = state.results.A;
    const b = state.results.B;
    const traced = (r) => r && !r.error && r.ext && r.ext.trace && r.ext.trace[0];
    if (!traced(a) || !traced(b)) {
      if (!box.hidden) {
        box.hidden = true;
        for (const slot of ["A", "B"]) if (state.results[slot]) renderResult(slot); // drop stale outlines
      }
      return;
    }
    const la = a.ext.trace[0].layers;
    const lb = new Map(b.ext.trace[0].layers.map((l) => [l.layer, l]));
    let shared = 0;
    let vuDiff = 0;
    let ifDiff = 0;
    let wa = 0;
    let wb = 0;
    for (const l of la) {
      const o = lb.get(l.layer);
      if (!o) continue;
      shared += 1;
      if (o.vu_expert !== l.vu_expert) vuDiff += 1;
      if (o.if_expert !== l.if_expert) ifDiff += 1;
      wa += l.w_if;
      wb += o.w_if;
    }
    const label = (r) => `${r.model} · ${r.req.how}`;
    box.hidden = false;
    box.dataset.layers = shared;
    box.dataset.vuDiff = vuDiff;
    box.dataset.ifDiff = ifDiff;
    box.replaceChildren(
      el("strong", { text: "A vs B: " }),
      `VU experts differ in ${vuDiff} of ${shared} layers, IF experts in ${ifDiff} of ${shared}; ` +
        `mean w_if ${shared ? (wa / shared).toFixed(2) : "–"} vs ${shared ? (wb / shared).toFixed(2) : "–"}. `,
      el("span", { class: "muted", text: `A: ${label(a)} — B: ${label(b)}` }),
    );
    // Re-draw both grids so that each outlines where it differs from the other.
    for (const slot of ["A", "B"]) renderResult(slot);
  }

  // ---------------------------------------------------------------- versions
  function evalSummary(ev) {
    if (!ev || typeof ev !== "object" || !Object.keys(ev).length) return null;
    const list = el("ul", { class: "eval" });
    const row = ev.row && typeof ev.row === "object" ? ev.row : null;
    if (row) {
      for (const [task, m] of Object.entries(row)) {
        const obj = m && typeof m === "object" ? m : { score: m };
        const metric = obj.metric ? `${obj.metric} ` : "";
        const extra = obj.format_rate !== undefined ? ` · format ${fmtNumber(obj.format_rate)}` : "";
        const n = obj.n !== undefined ? ` · n ${obj.n}` : "";
        list.append(el("li", { text: `${task}: ${metric}${fmtNumber(obj.score)}${extra}${n}` }));
      }
    }
    for (const [k, v] of Object.entries(ev)) {
      if (k === "row") continue;
      const text = v !== null && typeof v === "object" ? JSON.stringify(v).slice(0, 80) : fmtNumber(v);
      list.append(el("li", { text: `${k}: ${text}` }));
    }
    return list;
  }

  async function refreshVersions() {
    const data = await getJSON("console/api/versions");
    state.versions = data;
    const act = data.active;
    const now = state.lastMetrics ? state.lastMetrics.time : Date.now() / 1000;
    for (const v of data.versions) {
      if (v.loaded_at) addEvent(`load:${v.version}:${v.loaded_at}`, v.loaded_at, `v${v.version} loaded`, "load");
    }
    if (state.lastActive !== undefined && act !== state.lastActive && act) {
      addEvent(`active:${act}:${now}`, now, `v${act} active`, "activate");
    }
    state.lastActive = act;
    const key = JSON.stringify(data) + "|" + Boolean(keys.admin);
    if (key !== state.versionsKey) {
      state.versionsKey = key;
      renderVersions();
    }
  }

  function renderVersions() {
    const data = state.versions;
    const body = $("versions-table").tBodies[0];
    const admin = Boolean(keys.admin);
    $("rollback").disabled = !admin || !data || !data.adapters;
    $("rollback").title = admin ? "activate the version that was active before" : "type the admin key at the top first";
    if (!data) return;
    if (!data.adapters) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "This server serves the base model without adapters: no checkpoint versions." })));
      return;
    }
    if (!data.versions.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "No version is published in the registry yet." })));
      return;
    }
    const decided = new Map(); // version -> its latest promotion decision
    for (const d of (data.promotion && data.promotion.decisions) || []) decided.set(d.version, d);
    const rows = [];
    for (const v of [...data.versions].reverse()) {
      const d = decided.get(v.version);
      const promotion = d ? el("div", { class: "muted small promotion", text: `promotion: ${d.decision.replace("_", " ")}`, title: d.reason }) : null;
      const stateText = v.active ? "active" : v.resident ? "resident" : "published";
      const when = v.loaded_at ? `loaded ${fmtTime(v.loaded_at)}` : v.created_at ? `published ${v.created_at.replace("T", " ").slice(0, 19)}` : "";
      const actions = el("td", { class: "actions" });
      const button = (action, label, enabled) => {
        const b = el("button", { type: "button", class: "admin", text: label, "data-action": action, "data-version": v.version });
        b.disabled = !admin || !enabled;
        b.title = admin ? `${label} version ${v.version}` : "type the admin key at the top first";
        return b;
      };
      actions.append(
        button("load", "Load", !v.resident),
        button("activate", "Activate", !v.active),
        button("unload", "Unload", v.resident && !v.active),
      );
      const tasks = el("td", { class: "tasks" }, ...(v.tasks || [v.task]).map((t) => el("span", { class: "chip", text: t })));
      rows.push(
        el(
          "tr",
          { "data-version": v.version, "data-state": stateText, class: stateText },
          el("td", {}, el("strong", { text: `v${v.version}` }), el("div", { class: "muted small", text: v.name })),
          tasks,
          el("td", {}, el("span", { class: "badge " + stateText, text: stateText }), el("div", { class: "muted small", text: when }), promotion),
          el("td", {}, evalSummary(v.eval) || el("span", { class: "muted", text: v.manifest_error || "no evaluation in the manifest" })),
          actions,
        ),
      );
    }
    body.replaceChildren(...rows);
  }

  async function adminAction(action, version) {
    const msg = $("versions-message");
    const path = action === "rollback" ? "admin/checkpoints/rollback" : `admin/checkpoints/${action}`;
    const body = action === "rollback" ? {} : action === "load" ? { version, activate: false } : { version };
    showMessage(msg, `${action} ${version ? "v" + version : ""}…`, "info");
    try {
      const out = await getJSON(path, { method: "POST", body, admin: true });
      const done = {
        load: `version ${version} is loaded (resident); active: v${out.active}`,
        activate: `version ${out.active} is active`,
        rollback: `rolled back: version ${out.active} is active`,
        unload: `version ${version} is unloaded; active: v${out.active}`,
      }[action];
      showMessage(msg, done, "ok");
    } catch (e) {
      showMessage(msg, e.message, "error");
    }
    await Promise.allSettled([refreshVersions(), refreshModels(), refreshReady()]);
  }

  // ---------------------------------------------------------------- live metrics
  function addEvent(key, t, label, kind) {
    if (!state.events.has(key)) state.events.set(key, { t, label, kind });
  }

  async function refreshMetrics() {
    const m = await getJSON("console/api/metrics");
    const prev = state.lastMetrics;
    let tput = null;
    let rps = null;
    if (prev && m.time > prev.time) {
      const dt = m.time - prev.time;
      tput = Math.max(0, (m.tokens.generation - prev.tokens.generation) / dt);
      rps = Math.max(0, (m.requests.total - prev.requests.total) / dt);
    }
    state.lastMetrics = m;
    state.history.push({ t: m.time, ttft: m.latency.ttft.p50, e2e: m.latency.e2e.p50, tput });
    while (state.history.length && state.history[0].t < m.time - HISTORY_S) state.history.shift();
    renderTiles(m, tput, rps);
    renderTimeline();
    renderUsage(m.expert_usage);
  }

  function tile(label, value, sub, name) {
    return el("div", { class: "tile", "data-metric": name }, el("div", { class: "tile-label", text: label }), el("div", { class: "tile-value", text: value }), el("div", { class: "tile-sub muted", text: sub || "" }));
  }

  function renderTiles(m, tput, rps) {
    const L = m.latency;
    const pct = (h) => `p90 ${fmtSeconds(h.p90)} · p99 ${fmtSeconds(h.p99)}`;
    const status = Object.entries(m.requests.by_status).map(([s, n]) => `${s}: ${n}`).join(" · ");
    $("tiles").replaceChildren(
      tile("TTFT p50", fmtSeconds(L.ttft.p50), pct(L.ttft), "ttft"),
      tile("ITL p50", fmtSeconds(L.itl.p50), pct(L.itl), "itl"),
      tile("e2e p50", fmtSeconds(L.e2e.p50), pct(L.e2e), "e2e"),
      tile("throughput", tput === null ? "–" : `${tput.toFixed(1)} tok/s`, rps === null ? "" : `${rps.toFixed(2)} req/s`, "throughput"),
      tile("queue depth", `${m.waiting}`, `${m.running} running · queue p90 ${fmtSeconds(L.queue.p90)}`, "queue"),
      tile("requests", `${m.requests.total}`, status, "requests"),
      tile("tokens", `${m.tokens.generation}`, `generated · ${m.tokens.prompt} prompt`, "tokens"),
      tile("hot loads", `${m.checkpoint_loads.ok}`, `${m.checkpoint_loads.error} failed · load p50 ${fmtSeconds(L.checkpoint_load.p50)}`, "loads"),
    );
  }

  function renderTimeline() {
    const node = $("timeline");
    const width = Math.max(280, Math.round(node.clientWidth || 600));
    const height = 170;
    node.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const pad = { l: 46, r: 46, t: 14, b: 22 };
    const h = state.history;
    node.replaceChildren();
    if (!h.length) return;
    const t1 = h[h.length - 1].t;
    const t0 = Math.min(h[0].t, t1 - 60);
    const x = (t) => pad.l + ((t - t0) / Math.max(1, t1 - t0)) * (width - pad.l - pad.r);
    const maxLat = Math.max(1e-3, ...h.flatMap((p) => [p.ttft || 0, p.e2e || 0]));
    const maxTput = Math.max(1, ...h.map((p) => p.tput || 0));
    const yl = (v) => height - pad.b - (v / maxLat) * (height - pad.t - pad.b);
    const yt = (v) => height - pad.b - (v / maxTput) * (height - pad.t - pad.b);
    node.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: height - pad.b, y2: height - pad.b, class: "axis" }));
    const label = (text, attrs) => {
      const t = svg("text", attrs);
      t.textContent = text;
      node.append(t);
    };
    label(fmtSeconds(maxLat), { x: 4, y: pad.t + 4, class: "axis-label" });
    label(`${maxTput.toFixed(0)} tok/s`, { x: width - 4, y: pad.t + 4, class: "axis-label", "text-anchor": "end" });
    label(`-${Math.round(t1 - t0)} s`, { x: pad.l, y: height - 6, class: "axis-label" });
    label("now", { x: width - pad.r, y: height - 6, class: "axis-label", "text-anchor": "end" });
    const lanes = []; // per text row, the [start, end] x ranges its labels already take
    const shown = [...state.events.values()].filter((ev) => ev.t >= t0 && ev.t <= t1 + 5).sort((a, b) => a.t - b.t);
    for (const ev of shown) {
      const ex = Math.min(x(ev.t), width - pad.r);
      node.append(svg("line", { x1: ex, x2: ex, y1: pad.t, y2: height - pad.b, class: "event " + ev.kind }));
      const w = 6 * ev.label.length; // about 6 px per character at 10 px
      const right = ex + 3 + w > width - 4; // near the right edge: text to the left of the line
      const span = right ? [ex - 3 - w, ex - 3] : [ex + 3, ex + 3 + w];
      let lane = lanes.findIndex((taken) => taken.every(([a, b]) => span[1] < a - 4 || span[0] > b + 4));
      if (lane < 0) lane = lanes.push([]) - 1;
      lanes[lane].push(span);
      label(ev.label, { x: right ? span[1] : span[0], y: pad.t + 22 + 12 * lane, class: "event-label " + ev.kind, "text-anchor": right ? "end" : "start" });
    }
    const line = (key, scale, cls) => {
      const pts = h.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => `${x(p.t).toFixed(1)},${scale(p[key]).toFixed(1)}`);
      if (pts.length) node.append(svg("polyline", { points: pts.join(" "), class: "series " + cls }));
    };
    line("ttft", yl, "ttft");
    line("e2e", yl, "e2e");
    line("tput", yt, "tput");
  }

  function renderUsage(usage) {
    const box = $("expert-usage");
    if (!usage || !usage.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No routed requests yet." }));
      return;
    }
    const active = state.versions && state.versions.versions.find((v) => v.active);
    let numExperts = active && active.num_experts;
    if (!numExperts) {
      let maxVu = 0;
      let maxIf = 0;
      for (const u of usage) {
        for (const e of Object.keys(u.vu || {})) maxVu = Math.max(maxVu, Number(e));
        for (const e of Object.keys(u.if || {})) maxIf = Math.max(maxIf, Number(e));
      }
      numExperts = Math.max(2 * (maxVu + 1), maxIf + 1);
    }
    const half = Math.floor(numExperts / 2);
    const table = el("table", { class: "route-grid usage-grid" + (numExperts > 8 ? " dense" : ""), "data-layers": usage.length, "data-experts": numExperts });
    const top = el("tr", {}, el("th", { rowSpan: 2, class: "layer-col", text: "layer" }), el("th", { colSpan: half, class: "vu group", text: "VU" }), el("th", { colSpan: numExperts - half, class: "if group", text: "IF" }));
    const ids = el("tr", {});
    for (let e = 0; e < numExperts; e++) ids.append(el("th", { class: e < half ? "vu id" : "if id", text: e }));
    table.append(el("thead", {}, top, ids));
    const body = el("tbody");
    for (const u of usage) {
      const row = el("tr", { "data-layer": u.layer }, el("th", { class: "layer-name", title: u.layer, text: shortLayer(u.layer) }));
      const totals = { vu: 0, if: 0 };
      for (const kind of ["vu", "if"]) for (const n of Object.values(u[kind] || {})) totals[kind] += n;
      for (let e = 0; e < numExperts; e++) {
        const kind = e < half ? "vu" : "if";
        const n = (u[kind] || {})[String(e)] || 0;
        const share = totals[kind] ? n / totals[kind] : 0;
        const td = el("td", { class: "cell " + kind, text: n ? String(n) : "", title: `${u.layer}: ${kind.toUpperCase()} expert ${e} chosen ${n} times (${(100 * share).toFixed(0)}%)` });
        if (n) td.style.backgroundColor = kind === "vu" ? `rgba(20, 110, 190, ${0.1 + 0.8 * share})` : `rgba(225, 110, 20, ${0.1 + 0.8 * share})`;
        row.append(td);
      }
      body.append(row);
    }
    table.append(body);
    box.replaceChildren(table);
  }

  // ---------------------------------------------------------------- polling and wiring
  async function poll(fn, messageNode) {
    try {
      await fn();
      if (messageNode && messageNode.dataset.poll === "1") {
        showMessage(messageNode, "");
        delete messageNode.dataset.poll;
      }
    } catch (e) {
      if (messageNode) {
        showMessage(messageNode, e.message, "error");
        messageNode.dataset.poll = "1";
      }
    }
  }

  function pollAll() {
    return Promise.allSettled([
      refreshReady(),
      poll(refreshModels, null),
      poll(refreshVersions, $("versions-message")),
      poll(refreshMetrics, $("live-message")),
    ]);
  }

  function start() {
    wireImageInput();
    $("try-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const slot = e.submitter && e.submitter.value === "B" ? "B" : "A";
      runRequest(slot);
    });
    $("instruction-mode").addEventListener("change", (e) => {
      $("instruction-type-label").hidden = e.target.value !== "type";
      $("instruction-text-label").hidden = e.target.value !== "text";
    });
    $("version").addEventListener("change", refreshInstructionTypes);
    let keyTimer = null;
    $("api-key").addEventListener("input", (e) => {
      keys.api = e.target.value.trim();
      clearTimeout(keyTimer);
      keyTimer = setTimeout(pollAll, 300);
    });
    $("admin-key").addEventListener("input", (e) => {
      keys.admin = e.target.value.trim();
      renderVersions();
    });
    $("versions-table").addEventListener("click", (e) => {
      const b = e.target.closest("button[data-action]");
      if (b && !b.disabled) adminAction(b.dataset.action, Number(b.dataset.version));
    });
    $("rollback").addEventListener("click", () => adminAction("rollback", null));
    window.addEventListener("resize", renderTimeline);
    pollAll();
    setInterval(pollAll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
