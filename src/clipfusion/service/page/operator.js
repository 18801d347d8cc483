// The operator page: inspect images with a model, see the latest verdict large, review the history, and
// record feedback (a false alarm is confirmed first and can be undone).
"use strict";
const state = { offset: 0, limit: 20, total: 0 };
const UNDO_SECONDS = 15;
const $ = (id) => document.getElementById(id);

// What an operator reads for each error code the API answers (docs/service.md lists them all).
const PLAIN = {
  unauthorized: "This page needs an API key: type it in the header.",
  forbidden: "Your key may inspect and give feedback, but not change the model: ask a supervisor.",
  queue_full: "The station is busy. Try again in a moment.",
  busy: "The station is busy with large images. Try again in a moment.",
  shutting_down: "The service is restarting. Try again in a minute.",
  not_ready: "The service is starting. Try again in a minute.",
  upload_too_large: "These files are too large to send at once. Send fewer or smaller images.",
  image_too_large: "The image is too large for this station.",
  over_pixel_budget: "These images are too large to inspect at once. Send fewer at a time.",
  unreadable_image: "The file is not an image this station can read (use PNG, JPEG, BMP or TIFF).",
  no_image: "No image was sent.",
  not_finite: "The model could not score this image. Tell your administrator.",
  storage_failed: "The result could not be saved (the disk may be full). Tell your administrator.",
  deadline_exceeded: "The inspection took too long. Try again.",
  image_not_stored: "This image was not kept, so the model cannot learn from it.",
  already_learned: "The model has already learned from this image.",
  learned: "The model has learned from this false alarm already: a supervisor can roll the model back.",
  no_earlier_version: "There is no earlier model version to go back to.",
  database_unreachable: "The inspection records cannot be reached. Tell your administrator.",
};

class ApiError extends Error {
  constructor(status, body) {
    const reference = body.request_id ? ` (reference ${body.request_id})` : "";
    super(PLAIN[body.code] || `Something went wrong${reference}. Try again; if it keeps happening, tell your ` +
      "administrator.");
    this.status = status;
    this.code = body.code;
  }
}

function headers(extra = {}) {
  const key = $("key").value || sessionStorage.getItem("clipfusion-key") || "";
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) $("key-label").hidden = false;
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
  return response;
}

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
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

function button(title, onclick) {
  const element = text("button", title);
  element.type = "button";
  element.onclick = onclick;
  return element;
}

function badge(decision) {
  return text("span", decision, `badge ${decision}`);
}

function showVerdict(inspection) {
  const banner = $("verdict");
  banner.className = `verdict ${inspection.decision}`;
  $("verdict-mark").textContent = inspection.decision === "NG" ? "✕" : "✓";
  $("verdict-word").textContent = inspection.decision;
  $("verdict-detail").textContent = `${inspection.filename} · score ${inspection.score.toFixed(3)}` +
    (inspection.decision === "NG" ? ` · ${inspection.regions.length} region(s)` : "");
}

async function loadModels() {
  const models = await (await api("/v1/models")).json();
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (${m.category})`, m.name)));
  if (models.some((m) => m.name === chosen)) select.value = chosen;
  const m = models.find((x) => x.name === select.value);
  const panel = $("model-panel");
  panel.replaceChildren(m ? `${m.name}: ${m.category}, preset ${m.preset}, image threshold ` +
    `${m.image_threshold.toFixed(4)}, pixel threshold ${m.pixel_threshold.toFixed(4)}, ${m.bank_size} ` +
    `references, clipfusion ${m.version}, file ${m.sha256.slice(0, 12)}` : "no model");
  if (!m) return;
  const versions = await (await api(`/v1/models/${encodeURIComponent(m.name)}/versions`)).json();
  const active = versions.find((v) => v.active);
  panel.append(` · ${versions.length} version(s), active #${active ? active.id : "?"} `);
  const health = document.createElement("span");
  health.id = "model-health";
  panel.append(health);
  await loadHealth();
  if (active && active.parent_id !== null) {
    const rollback = button("roll back", async () => {
      try {
        await api(`/v1/models/${encodeURIComponent(m.name)}/rollback`, { method: "POST" });
        await loadModels();
        say("The model is back at its earlier version.");
      } catch (error) {
        say(error.message, true);
      }
    });
    rollback.id = "rollback";
    panel.append(rollback);
  }
}

// Can the verdicts be trusted: the self-check at load and the score drift of the version served
// (docs/reliability.md); refreshed after every inspection.
async function loadHealth() {
  const span = $("model-health");
  if (!span || !$("model").value) return;
  const h = await (await api(`/v1/models/${encodeURIComponent($("model").value)}/health`)).json();
  const check = h.self_check ? `self-check ${h.self_check.verdict}` : "no self-check";
  span.textContent = ` · ${check} · drift: ${h.drift.state} (${h.drift.detail}; ${h.drift.images} verdict(s) of ` +
    "this version) ";
  span.className = h.drift.state === "alarm" || (h.self_check && h.self_check.verdict === "different") ? "error" : "";
}

async function inspect(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  say(`Inspecting ${files.length} image(s)…`);
  try {
    const answer = await (await api(`/v1/models/${encodeURIComponent($("model").value)}/inspect`,
      { method: "POST", body: form })).json();
    const failed = answer.failed.map((f) => `${f.filename}: ${PLAIN[f.code] || "could not be inspected."}`);
    say([`${answer.inspections.length} inspected.`, ...failed].join(" "), failed.length > 0);
    for (const inspection of answer.inspections) {
      const figure = document.createElement("figure");
      figure.dataset.id = inspection.id;
      const img = document.createElement("img");
      img.alt = `overlay of ${inspection.filename}`;
      img.src = await imageUrl(inspection.overlay_url);
      const caption = document.createElement("figcaption");
      caption.append(badge(inspection.decision),
        ` ${inspection.filename}: score ${inspection.score.toFixed(4)}, ${inspection.regions.length} region(s)`);
      figure.append(img, caption);
      $("results").prepend(figure);
    }
    if (answer.inspections.length) showVerdict(answer.inspections[answer.inspections.length - 1]);
    await loadHistory();
    await loadHealth();
  } catch (error) {
    say(error.message, true);
  }
}

// The verdicts that mean something for a decision: a false alarm or a confirmed defect for NG, a missed
// defect for OK (confirming an OK part is what the line does all day: no button for it).
function choices(decision) {
  return decision === "NG" ? [["normal", "false alarm"], ["anomalous", "confirm defect"]]
    : [["anomalous", "missed defect"]];
}

function feedbackWords(label, decision) {
  if (label === "normal") return decision === "NG" ? "false alarm" : "confirmed good";
  return decision === "NG" ? "confirmed defect" : "missed defect";
}

function showButtons(item, feedbackCell, buttons) {
  buttons.replaceChildren(...choices(item.decision).flatMap(([label, title]) => [button(title, () => {
    if (label === "normal") confirmFalseAlarm(item, feedbackCell, buttons);
    else record(item, label, feedbackCell, buttons);
  }), " "]));
}

function confirmFalseAlarm(item, feedbackCell, buttons) {
  const box = text("span", "This part is good and the NG was wrong? ", "confirm");
  box.append(button("yes, false alarm", () => record(item, "normal", feedbackCell, buttons)), " ",
    button("cancel", () => showButtons(item, feedbackCell, buttons)));
  buttons.replaceChildren(box);
}

async function record(item, label, feedbackCell, buttons) {
  try {
    const answer = await (await api(`/v1/inspections/${item.id}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label, note: "" }),
    })).json();
    feedbackCell.textContent = feedbackWords(label, item.decision);
    if (answer.learned) {
      await loadModels();  // the new version, its threshold and bank, without a reload
      say(`The model learned from this image: it is now version #${answer.learned.version_id}.`);
      buttons.replaceChildren();
      return;
    }
    if (answer.learning) say("Recorded. A supervisor will confirm it before the model learns from it.");
    const undo = button("undo", async () => {
      try {
        await api(`/v1/inspections/${item.id}/feedback/${answer.id}`, { method: "DELETE" });
        feedbackCell.textContent = "";
        showButtons(item, feedbackCell, buttons);
      } catch (error) {
        say(error.message, true);
      }
    });
    buttons.replaceChildren(undo);
    setTimeout(() => { if (undo.isConnected) buttons.replaceChildren(); }, UNDO_SECONDS * 1000);
  } catch (error) {
    say(error.message, true);
  }
}

async function loadHistory(force = false) {
  if (busy() && !force) return;  // redrawn once the operator has finished
  const query = new URLSearchParams({ limit: state.limit, offset: state.offset });
  if ($("only-ng").checked) query.set("decision", "NG");
  const page = await (await api(`/v1/inspections?${query}`)).json();
  if (busy() && !force) return;  // the operator began a confirmation while the page was on its way
  state.total = page.total;
  $("page-info").textContent = `${page.total ? state.offset + 1 : 0}–${state.offset + page.items.length} of ${page.total}`;
  const rows = page.items.map((item) => {
    const row = document.createElement("tr");
    row.dataset.id = item.id;
    const last = item.feedback.length ? item.feedback[item.feedback.length - 1].label : "";
    const verdict = document.createElement("td");
    verdict.append(badge(item.decision));
    const feedbackCell = text("td", last ? feedbackWords(last, item.decision) : "");
    const buttons = document.createElement("td");
    if (!last) showButtons(item, feedbackCell, buttons);
    row.append(text("td", new Date(item.created).toLocaleString()), text("td", item.filename),
      text("td", item.model), text("td", item.score.toFixed(4)), verdict, text("td", String(item.regions.length)),
      feedbackCell, buttons);
    return row;
  });
  $("history").tBodies[0].replaceChildren(...rows);
}

function busy() {  // an operator is in the middle of a confirmation, or may still undo: do not redraw under them
  return [...document.querySelectorAll("#history button")].some((b) => ["undo", "cancel"].includes(b.textContent));
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
  $("only-ng").addEventListener("change", () => { state.offset = 0; loadHistory(true); });
  $("older").onclick = () => {
    if (state.offset + state.limit < state.total) { state.offset += state.limit; loadHistory(true); }
  };
  $("newer").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); loadHistory(true); };
  $("model").addEventListener("change", () => loadModels().catch((error) => say(error.message, true)));
  $("key").addEventListener("change", () => {
    if ($("key").value === sessionStorage.getItem("clipfusion-key")) return;  // a blur after the change
    sessionStorage.setItem("clipfusion-key", $("key").value);
    start();
  });
}

async function start() {
  try {
    await loadModels();
    await loadHistory(true);
    say("");
  } catch (error) {
    say(error.message, true);
  }
}

wire();
start();
// other stations' inspections and other operators' model changes appear within seconds
setInterval(() => {
  if (document.hidden) return;
  loadHistory().catch(() => {});
  loadModels().catch(() => {});
}, 5000);
