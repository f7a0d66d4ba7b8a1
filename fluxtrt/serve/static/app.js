// The web page of `fluxtrt serve`: it calls the same API as any client (POST /v1/images/edits).
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = null;

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "message error" : "message";
}

function choose(file) {
  if (!file) return;
  chosen = file;
  $("drop-text").textContent = file.name;
  $("input-image").src = URL.createObjectURL(file);
}

function showLoras(loras) {
  const select = $("lora");
  if (select.options.length > 1 || !loras.length) return;
  for (const lora of loras) {
    const option = document.createElement("option");
    option.value = lora.name;
    option.textContent = `${lora.name} (${lora.scale})`;
    select.appendChild(option);
  }
  $("lora-row").hidden = false;
}

async function status() {
  try {
    const answer = await fetch("/ready", { headers: headers() });
    const body = await answer.json();
    if (answer.ok) {
      $("status").textContent = `${body.model} on ${body.device}, batch up to ${body.max_batch}`;
      if (!$("steps").value) $("steps").placeholder = String(body.default_steps);
      showLoras(body.loras || []);
    } else {
      $("status").textContent = body.status ? `model ${body.status}` : body.error.message;
      setTimeout(status, 2000);
    }
  } catch (e) {
    $("status").textContent = "server unreachable";
    setTimeout(status, 2000);
  }
}

async function edit(event) {
  event.preventDefault();
  if (!chosen) { say("Choose an image first.", true); return; }
  const form = new FormData();
  form.append("image", chosen);
  form.append("prompt", $("prompt").value);
  form.append("response_format", "b64_json");
  for (const name of ["steps", "seed", "size", "lora"]) {
    if ($(name).value.trim()) form.append(name, $(name).value.trim());
  }
  if ($("lora").value && $("lora_scale").value.trim()) form.append("lora_scale", $("lora_scale").value.trim());
  $("submit").disabled = true;
  say("editing\u2026", false);
  const started = performance.now();
  try {
    const answer = await fetch("/v1/images/edits", { method: "POST", body: form, headers: headers() });
    const body = await answer.json();
    if (!answer.ok) { say(body.error ? body.error.message : answer.statusText, true); return; }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("output-image").src = "data:image/png;base64," + body.data[0].b64_json;
    $("output-caption").textContent =
      `edit ${body.size}, ${body.steps} steps, seed ${body.seed}: ${(body.timings_ms.edit / 1000).toFixed(2)} s ` +
      `on the server (${seconds} s here), ${body.model}` + (body.lora ? ` + LoRA ${body.lora}:${body.lora_scale}` : "");
    say(body.warnings.length ? "notice: " + body.warnings.join("; ") : "done", false);
  } catch (e) {
    say("request failed: " + e, true);
  } finally {
    $("submit").disabled = false;
  }
}

$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
$("edit-form").addEventListener("submit", edit);
$("key").addEventListener("change", status);
status();
