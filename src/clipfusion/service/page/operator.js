// The operator page: inspect images with a model, review the history, record feedback.
"use strict";
const state = { offset: 0, limit: 20, total: 0 };
const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  const key = $("key").value || sessionStorage.getItem("clipfusion-key") || "";
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) {
    $("key-label").hidden = false;
    throw new Error("an API key is needed: type it in the header");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    throw new Error(`${body.code || response.status}: ${body.detail}`);
  }
  return response;
}

async function imageUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value;
  if (className) element.className = className;
  return element;
}

async function loadModels() {
  const models = await (await api("/v1/models")).json();
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (${m.category})`, m.name)));
  const show = async () => {
    const m = models.find((x) => x.name === select.value);
    const panel = $("model-panel");
    panel.replaceChildren(m ? `${m.name}: ${m.category}, preset ${m.preset}, image threshold ` +
      `${m.image_threshold.toFixed(4)}, pixel threshold ${m.pixel_threshold.toFixed(4)}, ${m.bank_size} ` +
      `references, clipfusion ${m.version}, file ${m.sha256.slice(0, 12)}` : "no model");
    if (!m) return;
    const versions = await (await api(`/v1/models/${encodeURIComponent(m.name)}/versions`)).json();
    const active = versions.find((v) => v.active);
    panel.append(` · ${versions.length} version(s), active #${active ? active.id : "?"} `);
    if (active && active.parent_id !== null) {
      const button = text("button", "roll back");
      button.type = "button";
      button.id = "rollback";
      button.onclick = async () => {
        try {
          await api(`/v1/models/${encodeURIComponent(m.name)}/rollback`, { method: "POST" });
          await loadModels();
        } catch (error) {
          $("status").textContent = error.message;
          $("status").className = "error";
        }
      };
      panel.append(button);
    }
  };
  select.onchange = show;
  await show();
}

async function inspect(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  $("status").textContent = `inspecting ${files.length} image(s)...`;
  $("status").className = "";
  try {
    const answer = await (await api(`/v1/models/${encodeURIComponent($("model").value)}/inspect`,
      { method: "POST", body: form })).json();
    $("status").textContent = `${answer.inspections.length} inspected`;
    for (const inspection of answer.inspections) {
      const figure = document.createElement("figure");
      figure.dataset.id = inspection.id;
      const img = document.createElement("img");
      img.alt = `overlay of ${inspection.filename}`;
      img.src = await imageUrl(inspection.overlay_url);
      const caption = document.createElement("figcaption");
      caption.append(text("span", inspection.decision, inspection.decision),
        ` ${inspection.filename}: score ${inspection.score.toFixed(4)}, ${inspection.regions.length} region(s)`);
      figure.append(img, caption);
      $("results").prepend(figure);
    }
    await loadHistory();
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
  }
}

async function feedback(id, label, cell) {
  try {
    await api(`/v1/inspections/${id}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label, note: "" }),
    });
    cell.textContent = label === "normal" ? "false alarm" : "confirmed defect";
  } catch (error) {
    cell.textContent = error.message;
    cell.className = "error";
  }
}

async function loadHistory() {
  const query = new URLSearchParams({ limit: state.limit, offset: state.offset });
  if ($("only-ng").checked) query.set("decision", "NG");
  const page = await (await api(`/v1/inspections?${query}`)).json();
  state.total = page.total;
  $("page-info").textContent = `${page.total ? state.offset + 1 : 0}–${state.offset + page.items.length} of ${page.total}`;
  const rows = page.items.map((item) => {
    const row = document.createElement("tr");
    row.dataset.id = item.id;
    const last = item.feedback.length ? item.feedback[item.feedback.length - 1].label : "";
    const verdict = document.createElement("td");
    verdict.append(text("span", item.decision, item.decision));
    const feedbackCell = text("td", last === "normal" ? "false alarm" : last === "anomalous" ? "confirmed defect" : "");
    const buttons = document.createElement("td");
    for (const [label, title] of [["normal", "false alarm"], ["anomalous", "confirmed defect"]]) {
      const button = text("button", title);
      button.type = "button";
      button.onclick = () => feedback(item.id, label, feedbackCell);
      buttons.append(button, " ");
    }
    row.append(text("td", new Date(item.created).toLocaleString()), text("td", item.filename),
      text("td", item.model), text("td", item.score.toFixed(4)), verdict, text("td", String(item.regions.length)),
      feedbackCell, buttons);
    return row;
  });
  $("history").tBodies[0].replaceChildren(...rows);
}

function wire() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    inspect([...event.dataTransfer.files]);
  });
  $("files").addEventListener("change", (event) => inspect([...event.target.files]));
  $("only-ng").addEventListener("change", () => { state.offset = 0; loadHistory(); });
  $("older").onclick = () => { if (state.offset + state.limit < state.total) { state.offset += state.limit; loadHistory(); } };
  $("newer").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); loadHistory(); };
  $("key").addEventListener("change", () => { sessionStorage.setItem("clipfusion-key", $("key").value); start(); });
}

async function start() {
  try {
    await loadModels();
    await loadHistory();
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
  }
}

wire();
start();
setInterval(() => { if (!document.hidden) loadHistory().catch(() => {}); }, 5000);
