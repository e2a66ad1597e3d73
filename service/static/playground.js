// The playground: submit an async job (JSON, or multipart/form-data with an image to edit), follow
// GET /jobs/{id}/events, show each preview as the picture forms, then the image.
// Plain JS, no build step. Server-sent events are read with fetch() rather than EventSource so that the
// Authorization header can be sent when the deployment has API keys.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];
let currentJob = null;

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.detail || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function describeQuantization(q) {
  const scheme = q.quant_method === "none" ? "none (full precision)" : `${q.quant_method.toUpperCase()} ${q.bits}`;
  return `quantization ${scheme}, ${q.exec_mode} execution on ${q.device}`;
}

// The chosen model's limits, samplers and adapters; `model` empty = the deployment's default one.
async function loadInfo(model = "") {
  const response = await fetch(`/playground/info${model ? `?model=${encodeURIComponent(model)}` : ""}`);
  if (!response.ok) {
    setStatus(`Could not read the model information: ${await errorMessage(response)}`, true);
    return;
  }
  const info = await response.json();
  const models = $("model");
  models.replaceChildren(...info.models.map((name) => new Option(name, name)));
  models.value = info.model;
  models.disabled = info.models.length < 2;
  $("model-info").textContent = `Model ${info.model} · ${describeQuantization(info.quantization)}`;
  for (const [id, native, max] of [["width", info.native_width, info.max_width],
                                   ["height", info.native_height, info.max_height]]) {
    $(id).value = native;
    $(id).max = max;
    $(id).title = `at most ${max}, and width × height at most ${info.max_pixels} pixels`;
  }
  $("steps").max = info.max_steps;
  const sampler = $("scheduler");
  sampler.replaceChildren();
  if (!info.samplers.includes(info.default_sampler)) sampler.add(new Option("model's own", ""));
  for (const name of info.samplers) sampler.add(new Option(name, name));
  sampler.value = info.samplers.includes(info.default_sampler) ? info.default_sampler : "";
  // fewer previews than the deployment's may be asked for (a larger spacing, or 0 for none), not more
  $("preview-every").placeholder = info.preview_every_steps ? `${info.preview_every_steps} steps` : "off";
  $("preview-every").disabled = !info.preview_every_steps;
  // the deployment's LoRA adapters; a trigger word, if the adapter has one, is shown as its option's hint
  $("lora").replaceChildren(new Option("none", ""));
  for (const lora of info.loras) {
    const option = new Option(lora.trigger ? `${lora.name} (add "${lora.trigger}" to the prompt)` : lora.name, lora.name);
    $("lora").add(option);
  }
  $("lora").disabled = $("lora-scale").disabled = info.loras.length === 0;
  $("api-key-label").hidden = !info.auth_required;
  $("api-key").value = sessionStorage.getItem("dgq-api-key") || "";
}

// Yields {event, data} for each server-sent event of a streaming fetch response.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: data ? JSON.parse(data) : {} };
    }
  }
}

// The request: JSON for text-to-image, multipart/form-data (the same fields, the images as files) for an edit.
function request() {
  const fields = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    async: true,
  };
  for (const [id, field] of [["width", "width"], ["height", "height"], ["seed", "seed"], ["strength", "strength"],
                             ["preview-every", "preview_every"]]) {
    if ($(id).value !== "") fields[field] = Number($(id).value);
  }
  if ($("model").value !== "") fields.model = $("model").value;
  if ($("scheduler").value !== "") fields.scheduler = $("scheduler").value;
  if ($("lora").value !== "") fields.loras = [{ name: $("lora").value, scale: Number($("lora-scale").value) }];
  const image = $("init-image").files[0];
  if (!image) {
    return { headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(fields) };
  }
  const form = new FormData();
  // a multipart form carries loras as JSON text
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.append("init_image", image);
  if ($("mask").files[0]) form.append("mask", $("mask").files[0]);
  return { headers: authHeaders(), body: form };  // the browser sets the multipart boundary
}

function showPreview(data) {
  const image = $("image");
  image.src = `data:image/png;base64,${data.image}`;
  image.classList.add("preview");
  image.hidden = false;
  $("preview-note").hidden = false;
}

async function followJob(jobId) {
  const progress = $("progress");
  const stream = await fetch(`/jobs/${jobId}/events`, { headers: authHeaders() });
  if (!stream.ok) throw new Error(await errorMessage(stream));
  for await (const { event, data } of serverSentEvents(stream)) {
    if (event === "queued") setStatus(data.position ? `Queued, ${data.position} ahead…` : "Queued…");
    else if (event === "started") setStatus(`Running on ${data.worker}…`);
    else if (event === "step") {
      progress.max = data.steps;
      progress.value = data.step;
      setStatus(`Denoising: step ${data.step} of ${data.steps}`);
    } else if (event === "preview") showPreview(data);
    else if (TERMINAL.includes(event)) return;
  }
}

async function generate(event) {
  event.preventDefault();
  sessionStorage.setItem("dgq-api-key", $("api-key").value.trim());
  $("generate").disabled = true;
  $("image").hidden = true;
  $("preview-note").hidden = true;
  $("details").textContent = "";
  $("progress").value = 0;
  try {
    setStatus("Submitting…");
    const submitted = await fetch("/generate", { method: "POST", ...request() });
    if (submitted.status !== 202) throw new Error(await errorMessage(submitted));
    currentJob = (await submitted.json()).id;
    $("cancel").disabled = false;
    await followJob(currentJob);
    const stateResponse = await fetch(`/jobs/${currentJob}`, { headers: authHeaders() });
    if (!stateResponse.ok) throw new Error(await errorMessage(stateResponse));
    const state = await stateResponse.json();
    if (state.status !== "succeeded") {
      throw new Error(`Job ${state.status}${state.error ? `: ${state.error}` : "."}`);
    }
    const png = await fetch(state.images[0], { headers: authHeaders() });
    if (!png.ok) throw new Error(await errorMessage(png));
    const image = $("image");
    image.src = URL.createObjectURL(await png.blob());
    await image.decode();
    image.classList.remove("preview");
    image.hidden = false;
    $("preview-note").hidden = true;
    $("progress").value = $("progress").max;
    const timings = Object.entries(state.timings)
      .filter(([name]) => name.endsWith("_s"))
      .map(([name, seconds]) => `${name.slice(0, -2).replaceAll("_", " ")} ${seconds.toFixed(2)} s`);
    $("details").textContent = `Job ${state.id} · seed ${state.seeds[0]} · ${timings.join(" · ")}`;
    setStatus("Done.");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    currentJob = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (currentJob === null) return;
  const response = await fetch(`/jobs/${currentJob}/cancel`, { method: "POST", headers: authHeaders() });
  if (!response.ok) setStatus(await errorMessage(response), true);
}

$("generate-form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("model").addEventListener("change", () => loadInfo($("model").value));
loadInfo();
