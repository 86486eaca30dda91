// The selection viewer: runs a prompt through this server's OpenAI-compatible API (streamed) and
// draws what the response's `compression.selection` says was kept. Every span, score bin and
// layer row comes from the server (server/engine/spans.py builds them); this file only draws.
// Plain JS, no build step and no CDN: the server may have no internet.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("viewer-config").textContent);
  const $ = (selector, root = document) => root.querySelector(selector);
  const LANES = ["a", "b"];
  // Text goes into the page in pieces, a frame's worth at a time, so a 32K-token prompt never
  // blocks the tab: PIECE_CHARS per element, FRAME_CHARS per turn of the event loop.
  const PIECE_CHARS = 2000;
  const FRAME_CHARS = 16000;

  let apiKey = ""; // memory only: never written to storage, a cookie or the URL
  let controller = null;
  const runs = {}; // lane -> {body, text, final, usage, error, rendered}
  const renderTokens = {}; // lane -> counter; a newer render supersedes an older one
  // For debugging in the console and for the browser tests: what each lane's run returned.
  window.gemserveViewer = { runs, config };

  // ---- the API ---------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, info, requestId) {
      super(info.message || `HTTP ${status}`);
      this.status = status;
      this.info = info;
      this.requestId = requestId;
    }
  }

  function apiHeaders() {
    const headers = { "Content-Type": "application/json" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    return headers;
  }

  async function errorOf(response) {
    let info = { message: response.statusText || "request failed" };
    try {
      const body = await response.json();
      if (body && body.error) info = body.error;
    } catch (_) {
      // not JSON: keep the status text
    }
    return new ApiError(response.status, info, response.headers.get("X-Request-Id"));
  }

  function describeError(error) {
    if (error instanceof ApiError) {
      if (error.status === 401) {
        return `401 Unauthorized: ${error.info.message}. Enter this server's API key above.`;
      }
      const param = error.info.param ? ` (${error.info.param})` : "";
      const id = error.requestId ? ` [request id ${error.requestId}]` : "";
      return `${error.status} ${error.info.type || "error"}: ${error.info.message}${param}${id}`;
    }
    if (error.name === "AbortError") return "stopped";
    return `could not reach the server: ${error.message}`;
  }

  async function checkServer() {
    const status = $("#server-status");
    status.classList.remove("bad");
    try {
      const response = await fetch("/v1/models", { headers: apiHeaders() });
      if (!response.ok) throw await errorOf(response);
      const model = (await response.json()).data[0];
      const context = model.max_model_len ? `, context ${model.max_model_len} tokens` : "";
      status.textContent = `Serving ${model.id} (${model.backend || "?"} backend${context}).`;
    } catch (error) {
      status.classList.add("bad");
      status.textContent =
        error instanceof ApiError && error.status === 401
          ? `This server needs an API key: its API answered ${describeError(error)}`
          : describeError(error);
    }
  }

  // Server-sent events from a fetch body: `data: {...}` blocks, then `data: [DONE]`.
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) {
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(Number(event.error.code) || 500, event.error);
        onData(event);
      }
      if (done) return;
    }
  }

  // ---- the form -> one request per lane --------------------------------------------------------
  function fillSelect(select, names, chosen, blankLabel) {
    select.replaceChildren();
    if (blankLabel) select.append(new Option(blankLabel, ""));
    for (const name of names) select.append(new Option(name, name, false, name === chosen));
  }

  function laneControls(lane) {
    const box = $(`fieldset.method[data-lane="${lane}"]`);
    return {
      method: $(".method-name", box),
      budget: $(".budget", box),
      attention: $(".attention", box),
      filterAttention: $(".filter-attention", box),
    };
  }

  function syncLaneControls(lane) {
    const controls = laneControls(lane);
    const method = controls.method.value;
    controls.budget.disabled = method === "none";
    controls.filterAttention.disabled = method !== "gemfilter";
  }

  function userMessage() {
    const context = $("#context").value;
    const question = $("#question").value.trim();
    if (!context.trim() && !question) throw new Error("enter a context, a question, or both");
    // The same message `gemserve generate --context-file F "question"` sends.
    if (!context.trim()) return question;
    return question ? `${context}\n\nQuestion: ${question}` : context;
  }

  function positiveInt(input, label) {
    const value = Number(input.value);
    if (!Number.isInteger(value) || value < 1) throw new Error(`${label} must be a whole number >= 1`);
    return value;
  }

  function requestBody(lane, content) {
    const controls = laneControls(lane);
    const method = controls.method.value;
    const compression = { method, return_selection: true, return_scores: true };
    if (method !== "none") compression.budget = positiveInt(controls.budget, `method ${lane.toUpperCase()}'s budget`);
    if (controls.attention.value) compression.attention = controls.attention.value;
    if (method === "gemfilter" && controls.filterAttention.value) {
      compression.filter_attention = controls.filterAttention.value;
    }
    return {
      messages: [{ role: "user", content }],
      max_tokens: positiveInt($("#max-tokens"), "max tokens"),
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
      compression,
    };
  }

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = !message;
  }

  async function runAll(event) {
    event.preventDefault();
    showError("");
    apiKey = $("#api-key").value;
    const lanes = $("#compare").checked ? LANES : ["a"];
    let bodies;
    try {
      const content = userMessage();
      bodies = lanes.map((lane) => requestBody(lane, content));
    } catch (error) {
      showError(error.message);
      return;
    }
    controller = new AbortController();
    $("#run").disabled = true;
    $("#stop").disabled = false;
    for (const lane of LANES) {
      delete runs[lane];
      $(`#lane-${lane}`).hidden = !lanes.includes(lane);
    }
    $("#comparison").hidden = lanes.length < 2;
    $("#comparison tbody").replaceChildren();
    try {
      // One after the other: each TTFT is the request's own, not shared with the other lane.
      for (const [i, lane] of lanes.entries()) {
        const ok = await runLane(lane, bodies[i], controller.signal);
        if (!ok && controller.signal.aborted) break;
      }
    } finally {
      $("#run").disabled = false;
      $("#stop").disabled = true;
      controller = null;
      document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
    }
  }

  async function runLane(lane, body, signal) {
    const root = resetLane(lane, body);
    const run = { body, text: "", final: null, usage: null, error: null, rendered: false };
    runs[lane] = run;
    const answer = $(".answer", root);
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: apiHeaders(),
        body: JSON.stringify(body),
        signal,
      });
      if (!response.ok) throw await errorOf(response);
      await readEvents(response, (chunk) => {
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          run.text += delta.content;
          answer.append(delta.content);
        }
        if (chunk.compression || chunk.metrics) run.final = chunk;
        if (chunk.usage) run.usage = chunk.usage;
      });
      if (!run.final) throw new Error("the stream ended without its final chunk");
    } catch (error) {
      run.error = describeError(error);
      showError(`Method ${lane.toUpperCase()}: ${run.error}`);
      answer.classList.add("failed");
      if (!answer.textContent) answer.textContent = run.error;
      addComparisonRow(lane, run);
      return false;
    }
    answer.classList.add("done");
    drawResult(lane, root, run);
    addComparisonRow(lane, run);
    return true;
  }

  function resetLane(lane, body) {
    const root = $(`#lane-${lane}`);
    root.replaceChildren($("#lane-template").content.cloneNode(true));
    const c = body.compression;
    const parts = [c.method];
    if (c.budget) parts.push(`budget ${c.budget}`);
    if (c.attention) parts.push(`attention ${c.attention}`);
    if (c.filter_attention) parts.push(`filter attention ${c.filter_attention}`);
    $(".lane-title", root).textContent = `${lane.toUpperCase()}: ${parts.join(", ")}`;
    return root;
  }

  // ---- one lane's result -----------------------------------------------------------------------
  const MIB = 1024 * 1024;
  const ms = (value) => `${Number(value).toFixed(0)} ms`;
  const bytes = (value) => `${(value / MIB).toFixed(2)} MiB (${value} B)`;

  // KV methods keep different positions per head: kept_tokens is per head, the union is named apart.
  const keptUnion = (c) => (c.kept_tokens_union === null || c.kept_tokens_union === undefined ? null : c.kept_tokens_union);

  function metricRows(final, usage) {
    const c = final.compression || {};
    const m = final.metrics || {};
    const rows = [
      ["method", "method", c.method + (c.layer !== null && c.layer !== undefined ? ` (filter layer ${c.layer})` : "")],
      ["prompt_tokens", "prompt tokens", c.prompt_tokens],
      ["kept_tokens", "kept tokens", `${c.kept_tokens} (${(100 * c.ratio).toFixed(1)}%)` + (keptUnion(c) ? " per KV head" : "")],
    ];
    if (keptUnion(c)) rows.push(["kept_tokens_union", "kept positions, any head", keptUnion(c)]);
    if (c.skipped) rows.push(["skipped", "skipped", c.skipped]);
    for (const [key, label] of [
      ["filter_attention", "filter-pass attention"],
      ["attention", "prefill attention"],
    ]) {
      if (c[key]) rows.push([key, label, `${c[key].backend}, density ${c[key].density.toFixed(3)} of causal pairs`]);
    }
    rows.push(
      ["select_ms", "select", ms(m.select_ms)],
      ["prefill_ms", "prefill", ms(m.prefill_ms)],
      ["ttft_ms", "TTFT", ms(m.ttft_ms)],
      ["queue_ms", "queue", ms(m.queue_ms)],
      ["decode_ms", "decode", `${ms(m.decode_ms)}, ${Number(m.output_tokens_per_s).toFixed(1)} tokens/s`],
      ["e2e_ms", "end to end", ms(m.e2e_ms)],
      ["kv_cache_bytes", "KV cache after prefill", bytes(m.kv_cache_bytes)],
    );
    if (c.kv_bytes_before !== null && c.kv_bytes_before !== undefined) {
      rows.push(["kv_bytes_before", "KV cache before pruning", bytes(c.kv_bytes_before)]);
    }
    rows.push(["peak_memory_bytes", "peak memory", `${bytes(m.peak_memory_bytes)}, ${m.memory_source}`]);
    if (usage) rows.push(["completion_tokens", "completion tokens", usage.completion_tokens]);
    return rows;
  }

  function drawResult(lane, root, run) {
    const dl = $(".metrics", root);
    for (const [key, label, value] of metricRows(run.final, run.usage)) {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.dataset.key = key;
      dd.textContent = String(value);
      dl.append(dt, dd);
    }
    const { compression, metrics } = run.final;
    $(".raw-json", root).textContent = JSON.stringify({ compression, metrics, usage: run.usage }, null, 2);
    const selection = compression && compression.selection;
    if (!selection) return;
    drawHeat(root, compression, selection);
    renderPrompt(lane, root, compression, selection).then((finished) => {
      run.rendered = finished;
    });
  }

  // ---- the heat strip (GemFilter scores) or the layer grid (KV methods) ------------------------
  function heatColour(value) {
    // Dark blue (0) -> teal -> yellow (1): readable on white, ordered in lightness.
    const v = Math.max(0, Math.min(1, value));
    const hue = 240 - 180 * v;
    return `hsl(${hue}, 85%, ${22 + 50 * v}%)`;
  }

  function drawHeat(root, compression, selection) {
    const box = $(".heat", root);
    const canvas = $(".heat-canvas", root);
    const hover = $(".heat-hover", root);
    const n = compression.prompt_tokens;
    const grid = heatGrid(selection);
    if (!grid) return;
    box.hidden = false;
    $(".heat-title", root).textContent = grid.title;
    const maskRows = 1; // the bottom row: the kept runs, in the strip's scale
    const rowHeight = grid.rows.length > 1 ? 6 : 28;
    const width = Math.max(200, canvas.parentElement.clientWidth || 800);
    canvas.width = width;
    canvas.height = grid.rows.length * rowHeight + 8 * maskRows;
    canvas.dataset.rows = String(grid.rows.length);
    canvas.dataset.bins = String(grid.rows[0].values.length);
    const ctx = canvas.getContext("2d");
    const binWidth = width / grid.rows[0].values.length;
    grid.rows.forEach((row, r) => {
      row.values.forEach((value, b) => {
        ctx.fillStyle = heatColour(value);
        ctx.fillRect(Math.floor(b * binWidth), r * rowHeight, Math.ceil(binWidth), rowHeight);
      });
    });
    const maskTop = grid.rows.length * rowHeight;
    ctx.fillStyle = "#eee";
    ctx.fillRect(0, maskTop, width, 8);
    ctx.fillStyle = "#c2410c";
    for (const segment of selection.segments) {
      if (!segment.kept) continue;
      const x = (segment.start / n) * width;
      ctx.fillRect(x, maskTop + 1, Math.max(1, ((segment.end - segment.start) / n) * width), 6);
    }
    const binAt = (event) => {
      const rect = canvas.getBoundingClientRect();
      const bins = grid.rows[0].values.length;
      const b = Math.min(bins - 1, Math.max(0, Math.floor(((event.clientX - rect.left) / rect.width) * bins)));
      const r = Math.min(grid.rows.length - 1, Math.floor(((event.clientY - rect.top) / rect.height) * canvas.height / rowHeight));
      return { b, r, start: b * grid.binTokens, end: Math.min(n, (b + 1) * grid.binTokens) };
    };
    canvas.onmousemove = (event) => {
      const { b, r, start, end } = binAt(event);
      const row = grid.rows[Math.max(0, r)];
      hover.textContent = `${row.label}tokens ${start}-${end}: ${grid.describe(row.values[b])} (click: show in the prompt)`;
    };
    canvas.onclick = (event) => showToken(root, selection, binAt(event).start);
  }

  function heatGrid(selection) {
    if (selection.scores) {
      const s = selection.scores;
      return {
        title: `Filter-layer score per token (bins of ${s.bin_tokens} token${s.bin_tokens > 1 ? "s" : ""}; 0 = the prompt's lowest, 1 = its highest), kept spans in orange below`,
        binTokens: s.bin_tokens,
        rows: [{ label: "", values: s.values }],
        describe: (v) => `highest score ${v.toFixed(3)}`,
      };
    }
    if (selection.layer_coverage && selection.layer_coverage.layers.length) {
      const lc = selection.layer_coverage;
      return {
        title: `Kept positions per layer (a row per layer, ${lc.layers[0].layer} at the top; bins of ${lc.bin_tokens} tokens; colour = share of the bin's head x position entries kept), kept union in orange below`,
        binTokens: lc.bin_tokens,
        rows: lc.layers.map((layer) => ({
          label: `layer ${layer.layer} (${layer.kv_tokens} entries per head), `,
          values: layer.coverage,
        })),
        describe: (v) => `${(100 * v).toFixed(0)}% kept`,
      };
    }
    return null;
  }

  function showToken(root, selection, token) {
    const segments = selection.segments;
    let lo = 0;
    let hi = segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (segments[mid].start <= token) lo = mid;
      else hi = mid - 1;
    }
    const element = $(`.prompt [data-seg="${lo}"]`, root);
    if (!element) return;
    element.scrollIntoView({ block: "center" });
    element.classList.add("flash");
    setTimeout(() => element.classList.remove("flash"), 1200);
  }

  // ---- the prompt, kept and dropped ------------------------------------------------------------
  function renderPrompt(lane, root, compression, selection) {
    const token = (renderTokens[lane] = (renderTokens[lane] || 0) + 1);
    const container = $(".prompt", root);
    const progress = $(".prompt-progress", root);
    const segments = selection.segments;
    const tailStart = compression.prompt_tokens - (selection.protected_tail || 0);
    const keptSpans = segments.filter((s) => s.kept).length;
    container.replaceChildren();
    container.dataset.rendered = "false";
    const began = performance.now();
    let frames = 0;
    let index = 0;
    let offset = 0;
    return new Promise((resolve) => {
      const step = () => {
        if (token !== renderTokens[lane]) return resolve(false);
        const fragment = document.createDocumentFragment();
        let budget = FRAME_CHARS;
        while (index < segments.length && budget > 0) {
          const segment = segments[index];
          const piece = segment.text.slice(offset, offset + PIECE_CHARS);
          const element = document.createElement("span");
          element.className = segment.kept ? "seg kept" : "seg dropped";
          if (offset === 0) element.classList.add("first");
          if (offset + PIECE_CHARS >= segment.text.length) element.classList.add("last");
          if (segment.kept && segment.start >= tailStart) element.classList.add("tail");
          element.dataset.seg = String(index);
          element.title = `tokens ${segment.start}-${segment.end} ${segment.kept ? "kept" : "dropped"}`;
          element.textContent = piece;
          fragment.append(element);
          budget -= Math.max(piece.length, 1);
          offset += PIECE_CHARS;
          if (offset >= segment.text.length) {
            index += 1;
            offset = 0;
          }
        }
        container.append(fragment);
        frames += 1;
        if (index < segments.length) {
          progress.textContent = `rendering the prompt: ${index} of ${segments.length} runs`;
          setTimeout(step, 0);
          return;
        }
        progress.textContent = `${segments.length} runs, ${keptSpans} kept span${keptSpans === 1 ? "" : "s"}; ${compression.kept_tokens} of ${compression.prompt_tokens} tokens kept`;
        void container.offsetHeight; // lay the text out before the clock stops
        container.dataset.renderMs = (performance.now() - began).toFixed(0);
        container.dataset.frames = String(frames);
        container.dataset.rendered = "true";
        resolve(true);
      };
      step();
    });
  }

  // ---- the side-by-side table ------------------------------------------------------------------
  function addComparisonRow(lane, run) {
    if ($("#comparison").hidden) return;
    const c = (run.final && run.final.compression) || {};
    const m = (run.final && run.final.metrics) || {};
    const answer = run.error ? run.error : run.text.trim();
    const cells = [
      lane.toUpperCase(),
      run.body.compression.method,
      run.final ? `${c.kept_tokens} / ${c.prompt_tokens}` : "",
      run.final ? m.ttft_ms.toFixed(0) : "",
      run.final ? m.prefill_ms.toFixed(0) : "",
      run.final ? m.select_ms.toFixed(0) : "",
      run.final ? String(m.kv_cache_bytes) : "",
      run.final ? String(m.peak_memory_bytes) : "",
      answer.length > 160 ? `${answer.slice(0, 160)}…` : answer,
    ];
    const row = document.createElement("tr");
    row.dataset.lane = lane;
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    $("#comparison tbody").append(row);
  }

  // ---- start -------------------------------------------------------------------------------------
  function start() {
    const preferred = config.methods.includes("gemfilter") ? "gemfilter" : config.default_method;
    for (const lane of LANES) {
      const controls = laneControls(lane);
      fillSelect(controls.method, config.methods, lane === "a" ? preferred : "none");
      fillSelect(controls.attention, config.attention, "", "server default");
      fillSelect(controls.filterAttention, config.attention, "", "server default");
      controls.method.addEventListener("change", () => syncLaneControls(lane));
      syncLaneControls(lane);
    }
    const compare = $("#compare");
    const laneB = $('fieldset.method[data-lane="b"]');
    const syncCompare = () => laneB.classList.toggle("off", !compare.checked);
    compare.addEventListener("change", syncCompare);
    syncCompare();
    const keyInput = $("#api-key");
    keyInput.addEventListener("change", () => {
      apiKey = keyInput.value;
      checkServer();
    });
    const context = $("#context");
    const showSize = () => {
      $("#context-size").textContent = context.value ? `${context.value.length} characters` : "";
    };
    context.addEventListener("input", showSize);
    $("#context-file").addEventListener("change", async (event) => {
      const file = event.target.files[0];
      if (!file) return;
      context.value = await file.text();
      showSize();
    });
    $("#run-form").addEventListener("submit", runAll);
    $("#stop").addEventListener("click", () => controller && controller.abort());
    checkServer();
  }

  start();
})();
