// The loragen playground: plain JavaScript, no build step, nothing loaded from elsewhere.
// Everything it shows comes from the service's own endpoints (docs/playground.md); text from the server or the
// user is only ever set as textContent, never parsed as HTML. The API key stays in this page's memory.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04"];
const VERDICTS = {
  replica: "a replica: this is (almost) the adapter of a training description",
  near: "close to a training task: nearer to it than training tasks are to one another",
  new: "something new: as far from every training adapter as training tasks are from one another, or farther",
};

const state = { info: null, adapter: null, blob: null };

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// fetch, and on a non-2xx answer throw the message of the service's error envelope
async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error) message = `${body.error.message} (${body.error.type}, ${response.status})`;
    } catch (_) { /* not JSON */ }
    if (response.status === 401 || response.status === 403) message += ": type an API key at the top";
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function show(element, visible) { element.hidden = !visible; }

function say(element, text) {
  element.textContent = text || "";
  show(element, Boolean(text));
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(2)} MiB`;
}

function num(x) { return Number(x).toPrecision(3); }

function checkpoint() {
  return state.info ? state.info.checkpoints.find((c) => c.id === $("checkpoint").value) : null;
}

function kind() { return document.querySelector("input[name=kind]:checked").value; }

// ---- what the server offers ---------------------------------------------------------------------------------

async function loadInfo() {
  say($("error"), "");
  try {
    state.info = await (await call("/v1/playground")).json();
  } catch (e) {
    say($("error"), `Cannot load the checkpoints: ${e.message}`);
    return;
  }
  const select = $("checkpoint");
  const previous = select.value;
  select.replaceChildren();
  for (const c of state.info.checkpoints) {
    const option = el("option", `${c.id} (${c.base_model})`);
    option.value = c.id;
    option.selected = previous ? c.id === previous : c.default;
    select.append(option);
  }
  onCheckpoint();
}

function onCheckpoint() {
  const c = checkpoint();
  if (!c) return;
  const chips = $("suggestions");
  chips.replaceChildren();
  for (const text of c.suggestions) {
    const chip = el("button", text, "chip");
    chip.type = "button";
    chip.addEventListener("click", () => {
      document.querySelector("input[name=kind][value=task]").checked = true;
      $("text").value = text;
    });
    chips.append(chip);
  }
  if (!$("text").value && c.suggestions.length) $("text").value = c.suggestions[0];
  if (!$("try-inputs").value) $("try-inputs").value = c.try.examples.join("\n");
}

// ---- generate -------------------------------------------------------------------------------------------------

function requestBody() {
  const c = checkpoint();
  const body = { [kind()]: $("text").value };
  if (c && !c.default) body.checkpoint = c.id;
  if ($("dtype").value !== "float32") body.dtype = $("dtype").value;
  return body;
}

function curlCommand(body, id) {
  const json = JSON.stringify(body);
  const quoted = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  const auth = $("api-key").value.trim() ? ` -H "Authorization: Bearer $LORAGEN_API_KEY"` : "";
  const data = json.length > 1500 ? "@request.json  # request.json: the JSON body" : quoted(json);
  return `curl -fsS ${location.origin}/v1/adapters -H 'content-type: application/json'${auth} \\\n     -d ${data} -o ${id}.safetensors`;
}

async function generate() {
  const body = requestBody();
  if (!body[kind()].trim()) {
    say($("error"), "Type a task description or a document first.");
    return;
  }
  say($("error"), "");
  $("generate").disabled = true;
  $("status").textContent = "generating…";
  const started = performance.now();
  try {
    const response = await call("/v1/adapters", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    state.blob = await response.blob();
    const ms = performance.now() - started;
    const id = response.headers.get("X-Adapter-Id");
    state.adapter = { id, checkpoint: checkpoint() };
    $("adapter-id").textContent = id;
    $("adapter-size").textContent = bytes(state.blob.size);
    const cache = response.headers.get("X-Cache");
    $("adapter-cache").textContent = cache;
    $("adapter-cache").className = `badge ${cache}`;
    $("adapter-time").textContent = `${ms.toFixed(0)} ms`;
    $("curl").textContent = curlCommand(body, id);
    show($("result"), true);
    $("status").textContent = "";
    await Promise.all([loadStats(id), loadNovelty(id), prepareTry()]);
  } catch (e) {
    $("status").textContent = "";
    say($("error"), `Generation failed: ${e.message}`);
  } finally {
    $("generate").disabled = false;
  }
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function downloadTar() {
  const id = state.adapter.id;
  try {
    const response = await call(`/v1/adapters/${id}?format=peft-tar`);
    download(await response.blob(), `${id}.tar`);
  } catch (e) {
    say($("error"), `Download failed: ${e.message}`);
  }
}

// ---- the chart --------------------------------------------------------------------------------------------------

async function loadStats(id) {
  show($("chart-card"), true);
  $("chart").replaceChildren();
  $("chart-caption").textContent = "computing…";
  try {
    const stats = await (await call(`/v1/adapters/${id}/stats`)).json();
    drawChart(stats);
  } catch (e) {
    $("chart-caption").textContent = `No statistics: ${e.message}`;
  }
}

function svg(tag, attributes, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (parent) parent.append(node);
  return node;
}

function drawChart(stats) {
  $("chart-caption").textContent =
    `‖ΔW‖_F of ΔW = ${num(stats.scaling)}·B·A for each layer and module (rank ${stats.rank}); ` +
    `over the whole adapter ${num(stats.total_norm)}. Computed from r×r products, never the full matrices.`;
  const width = 760, height = 280, left = 52, right = 12, top = 28, bottom = 36;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
                            "aria-label": "ΔW norm per layer and module" });
  const modules = stats.modules;
  const max = Math.max(1e-12, ...modules.flatMap((m) => stats.norms[m]));
  const plotW = width - left - right, plotH = height - top - bottom;
  const group = plotW / stats.n_layers;
  const barW = Math.max(1, (group * 0.8) / modules.length);
  const y = (v) => top + plotH - (v / max) * plotH;
  for (let k = 0; k <= 4; k++) {  // the axis and its grid
    const v = (max * k) / 4;
    svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }, root);
    svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, root).textContent = num(v);
  }
  for (let layer = 0; layer < stats.n_layers; layer++) {
    const x0 = left + layer * group + group * 0.1;
    modules.forEach((m, j) => {
      const v = stats.norms[m][layer] ?? 0;
      const bar = svg("rect", { x: x0 + j * barW, y: y(v), width: Math.max(0.5, barW - 1), height: top + plotH - y(v),
                                fill: COLORS[j % COLORS.length], class: "bar", "data-layer": layer, "data-module": m }, root);
      svg("title", {}, bar).textContent = `layer ${layer} ${m}: ${num(v)}`;
    });
    if (stats.n_layers <= 40 || layer % 4 === 0) {
      svg("text", { x: left + layer * group + group / 2, y: height - bottom + 16, "text-anchor": "middle", class: "tick" },
          root).textContent = layer;
    }
  }
  svg("text", { x: left + plotW / 2, y: height - 4, "text-anchor": "middle", class: "axis" }, root).textContent = "layer";
  modules.forEach((m, j) => {  // the legend
    const x = left + j * 110;
    svg("rect", { x, y: 6, width: 12, height: 12, fill: COLORS[j % COLORS.length] }, root);
    svg("text", { x: x + 17, y: 16, class: "legend" }, root).textContent = m;
  });
  $("chart").replaceChildren(root);
}

// ---- novelty ----------------------------------------------------------------------------------------------------

async function loadNovelty(id) {
  const c = checkpoint();
  show($("novelty-card"), true);
  show($("novelty-table"), false);
  if (c && !c.novelty.available) {
    $("novelty-summary").textContent = `Nothing to compare with: ${c.novelty.reason}`;
    return;
  }
  $("novelty-summary").textContent = "comparing with the training adapters… (the first time, the checkpoint " +
    "generates the adapter of each of its training descriptions)";
  try {
    const n = await (await call(`/v1/adapters/${id}/novelty`)).json();
    if (state.adapter.id !== id) return;
    if (!n.available) {
      $("novelty-summary").textContent = `Nothing to compare with: ${n.reason}`;
      return;
    }
    const nearest = n.nearest[0];
    const summary = $("novelty-summary");
    summary.replaceChildren(
      el("strong", n.verdict ? VERDICTS[n.verdict] : "compared"),
      document.createTextNode(
        `. Its ΔW lies ${num(nearest.distance)} from the nearest of ${n.training_adapters} training adapters ` +
        `(task ${nearest.task}); training tasks lie a typical ${num(n.typical_distance)} apart, and this adapter's ` +
        `own ‖ΔW‖ is ${num(n.norm)}.`),
    );
    summary.dataset.verdict = n.verdict || "";
    const body = $("novelty-table").querySelector("tbody");
    body.replaceChildren();
    for (const row of n.nearest) {
      const tr = el("tr");
      tr.append(el("td", row.description), el("td", row.task), el("td", num(row.distance), "number"));
      body.append(tr);
    }
    show($("novelty-table"), true);
  } catch (e) {
    $("novelty-summary").textContent = `No comparison: ${e.message}`;
  }
}

// ---- try it -----------------------------------------------------------------------------------------------------

async function prepareTry() {
  const c = state.adapter.checkpoint;
  show($("try-card"), true);
  show($("try-table"), false);
  say($("try-error"), "");
  if (c && !c.try.available) {
    say($("try-unavailable"), `Try-it is not available for this checkpoint: ${c.try.reason}. ` +
      "Generating and downloading work all the same.");
    show($("try-form"), false);
    return;
  }
  say($("try-unavailable"), "");
  show($("try-form"), true);
  await tryIt();
}

async function tryIt() {
  const inputs = $("try-inputs").value.split("\n").map((s) => s.trim()).filter((s) => s);
  if (!inputs.length) {
    say($("try-error"), "Type an input or two first, one per line.");
    return;
  }
  say($("try-error"), "");
  $("try").disabled = true;
  $("try-status").textContent = "running the base model with and without the adapter…";
  try {
    const response = await call("/v1/try", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: state.adapter.id, inputs }),
    });
    const result = await response.json();
    const body = $("try-table").querySelector("tbody");
    body.replaceChildren();
    for (const row of result.rows) {
      const tr = el("tr");
      const adapted = el("td", row.adapted, "adapted");
      if (row.adapted !== row.base) adapted.classList.add("changed");
      tr.append(el("td", row.input, "input"), el("td", row.base, "base"), adapted);
      body.append(tr);
    }
    show($("try-table"), true);
    $("try-status").textContent = "";
  } catch (e) {
    $("try-status").textContent = "";
    say($("try-error"), `Try-it failed: ${e.message}`);
  } finally {
    $("try").disabled = false;
  }
}

// ---- wiring -------------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", generate);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  $("checkpoint").addEventListener("change", onCheckpoint);
  $("api-key").addEventListener("change", loadInfo);
  $("download-safetensors").addEventListener("click", () => download(state.blob, `${state.adapter.id}.safetensors`));
  $("download-tar").addEventListener("click", downloadTar);
  $("try").addEventListener("click", tryIt);
  $("file").addEventListener("change", async () => {
    const file = $("file").files[0];
    if (!file) return;
    $("text").value = await file.text();
    document.querySelector("input[name=kind][value=document]").checked = true;
  });
  loadInfo();
});
