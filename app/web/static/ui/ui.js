// The inspection page: GET v1/models for the profiles, POST v1/score (multipart, explain=true) per drop.
// Plain JavaScript, no build step, no third-party code; every URL is relative to the page (/ui).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ddm-anomaly-api-key";

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return typeof error === "string" ? error : (error && error.message) || JSON.stringify(body);
  } catch (_) {
    return response.statusText;
  }
}

async function loadProfiles() {
  const select = $("profile");
  setStatus("Loading profiles…");
  const response = await fetch("v1/models", { headers: authHeaders() });
  if (!response.ok) {
    const hint = response.status === 401 ? " (enter the API key)" : "";
    setStatus(`Profiles: ${response.status} ${await errorMessage(response)}${hint}`, true);
    return;
  }
  const model = (await response.json()).models[0];
  $("model").textContent = `model: ${model.id} · ${model.options.method} · ${model.device}/${model.dtype}`;
  select.replaceChildren();
  for (const profile of model.profiles) {
    const option = document.createElement("option");
    option.value = profile.name;
    option.textContent = `${profile.name} (FPR ${profile.default_fpr}, ${profile.n_reference} reference images)`;
    option.selected = profile.name === model.default_profile;
    select.append(option);
  }
  select.disabled = model.profiles.length === 0;
  setStatus(model.profiles.length ? "Drop images to score them." : "This model has no usable profile yet.",
            model.profiles.length === 0);
}

function row(list, label, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = label;
  dd.textContent = value;
  dd.dataset.field = label;
  list.append(dt, dd);
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

function render(file, result, profile) {
  const card = document.createElement("article");
  card.className = "result";
  const verdict = result.is_anomaly ? "anomaly" : "normal";
  card.dataset.verdict = verdict;
  card.dataset.name = file.name;

  const title = document.createElement("h2");
  title.textContent = file.name;
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = URL.createObjectURL(file);
  image.alt = file.name;
  figure.append(image);
  if (result.heatmap_png) {
    const heat = document.createElement("img");
    heat.className = "heatmap";
    heat.src = `data:image/png;base64,${result.heatmap_png}`;
    heat.alt = `heat map of ${file.name}`;
    heat.style.opacity = $("opacity").value / 100;
    figure.append(heat);
  }
  // the model scores the largest centred square of the upload: say so when the rest was not looked at
  image.addEventListener("load", () => {
    const { naturalWidth: w, naturalHeight: h } = image;
    if (w !== h) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `Only the centred ${Math.min(w, h)} × ${Math.min(w, h)} px square of this ${w} × ${h} px` +
        " image was scored; the heat map covers that square.";
      card.append(note);
    }
  }, { once: true });
  const badge = document.createElement("span");
  badge.className = "verdict";
  badge.textContent = verdict;
  const facts = document.createElement("dl");
  row(facts, "score", fmt(result.score));
  row(facts, "threshold", fmt(result.threshold));
  row(facts, "percentile", `${fmt(result.percentile, 1)} %`);
  row(facts, "p-value", fmt(result.p_value, 4));
  row(facts, "profile", profile);
  card.append(title, figure, badge, facts);
  return card;
}

async function score(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || f.type === "");
  if (!images.length) return;
  const profile = $("profile").value;
  const form = new FormData();
  for (const file of images) form.append("files", file, file.name);
  const query = new URLSearchParams({ explain: "true" });
  if (profile && !$("profile").disabled) query.set("profile", profile);
  setStatus(`Scoring ${images.length} image${images.length > 1 ? "s" : ""}…`);
  const response = await fetch(`v1/score?${query}`, { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    setStatus(`Scoring: ${response.status} ${await errorMessage(response)}`, true);
    return;
  }
  const body = await response.json();
  const cards = body.results.map((result, i) => render(images[i], result, body.profile.name));
  $("results").prepend(...cards);
  const flagged = body.results.filter((r) => r.is_anomaly).length;
  setStatus(`${body.results.length} scored against ${body.profile.name} in ${Math.round(body.timings.total_ms)} ms:` +
            ` ${flagged} anomalous.`);
}

function wire() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => sessionStorage.setItem(KEY_STORE, key.value.trim()));
  $("settings").addEventListener("submit", (event) => {
    event.preventDefault();
    loadProfiles().catch((e) => setStatus(String(e), true));
  });
  $("files").addEventListener("change", (event) => {
    score(event.target.files).catch((e) => setStatus(String(e), true)).finally(() => { event.target.value = ""; });
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    score(event.dataTransfer.files).catch((e) => setStatus(String(e), true));
  });
  $("opacity").addEventListener("input", (event) => {
    for (const heat of document.querySelectorAll(".heatmap")) heat.style.opacity = event.target.value / 100;
    $("opacity-value").textContent = `${event.target.value} %`;
  });
  loadProfiles().catch((e) => setStatus(String(e), true));
}

wire();
