// The snapgen playground: the public HTTP API (docs/server.md) driven from a page, nothing else.
// Jobs are submitted with `Prefer: respond-async` and followed over GET /v1/jobs/{id}/events, read with
// fetch() rather than EventSource, which cannot send the Authorization header a server with keys needs.
// API paths are relative to the page, so it also works behind a proxy that serves the API under a prefix.

const KEY_STORAGE = 'snapgen.apiKey';
const MAX_SEED = 2 ** 32 - 1;
const MAX_RESULTS = 48;
const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/webp'];
// Where each request field is typed, to point at it when the server refuses its value.
const FIELD_INPUTS = {
  prompt: 'prompt', negative_prompt: 'negative', steps: 'steps', guidance_scale: 'guidance', n: 'n',
  seed: 'seed', width: 'size', height: 'size', image: 'image-file', strength: 'strength',
};

const $ = (id) => document.getElementById(id);
const el = Object.fromEntries([
  'model-info', 'key-form', 'api-key', 'generate-form', 'prompt', 'negative', 'steps', 'guidance', 'size', 'n',
  'seed', 'seed-random', 'seed-lock', 'img2img', 'image-file', 'image-help', 'image-chosen', 'image-thumb',
  'strength', 'strength-value', 'image-clear', 'generate', 'cancel', 'alert', 'progress', 'status', 'preview',
  'results', 'no-results', 'bundles', 'bundles-empty',
].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), $(id)]));

let model = null; // the served model as GET /v1/models describes it
let inputImage = null; // the image-to-image input, a data: URL
let current = null; // the running job: {id, controller, cancelRequested}

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    Object.assign(this, { status, code, field });
  }
}

// ---- the API

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function api(method, path, { body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not the API's error envelope (a proxy's page): the status says enough
  }
  const failure = new ApiError(response.status, error.code, error.message || `HTTP ${response.status}`, error.field);
  if (response.status === 401 || response.status === 403) askForKey();
  throw failure;
}

// Server-sent events from a fetch() response: yields {event, data} per dispatched event.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let name = '';
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A chunk may end between the \r and \n of one line break: keep a trailing \r for the next chunk.
      const end = buffer.endsWith('\r') ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(end);
      for (const line of lines) {
        if (line === '') {
          if (data.length) yield { event: name || 'message', data: data.join('\n') };
          name = '';
          data = [];
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? '' : line.slice(colon + 1);
          if (text.startsWith(' ')) text = text.slice(1);
          if (field === 'event') name = text;
          else if (field === 'data') data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- alerts, status, progress

function showError(error) {
  let message = error.message || String(error);
  if (error.field && !message.includes(error.field)) message = `${error.field}: ${message}`;
  el.alert.textContent = message;
  const input = error.field && $(FIELD_INPUTS[error.field] || '');
  if (input) {
    input.setAttribute('aria-invalid', 'true');
    input.setAttribute('aria-errormessage', 'alert');
  }
}

function clearErrors() {
  el.alert.textContent = '';
  for (const input of document.querySelectorAll('[aria-invalid]')) {
    input.removeAttribute('aria-invalid');
    input.removeAttribute('aria-errormessage');
  }
}

function setStatus(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

function onStatus(event) {
  if (event.cancel_requested) setStatus('canceling', 'Canceling…');
  else if (event.status === 'queued') {
    const ahead = event.queue_position;
    setStatus('queued', ahead ? `Queued: ${ahead} job${ahead === 1 ? '' : 's'} ahead.` : 'Queued: next in line.');
  } else if (event.status === 'running') setStatus('running', 'Running…');
}

function onProgress(event) {
  el.progress.max = event.steps;
  el.progress.value = event.step;
  // What arrived, for anyone checking the stream (the page's tests do): the count and the job's steps.
  el.progress.dataset.events = String(Number(el.progress.dataset.events || 0) + 1);
  el.progress.dataset.steps = String(event.steps);
  setStatus(current?.cancelRequested ? 'canceling' : 'running', `Step ${event.step} of ${event.steps}.`);
  if (event.preview) {
    el.preview.src = event.preview;
    el.preview.hidden = false;
  }
}

function setRunning(running) {
  el.generate.disabled = running;
  el.cancel.disabled = !running;
  for (const button of el.results.querySelectorAll('button')) button.disabled = running;
}

// ---- the request

function randomSeed(n) {
  const count = Math.min(Math.max(Math.trunc(Number(n)) || 1, 1), 8);
  const [value] = crypto.getRandomValues(new Uint32Array(1));
  return value % (MAX_SEED - count + 2); // seed + n - 1 stays a uint32
}

// The body from the form; numbers go as typed, so the server says what it allows.
function formBody() {
  const body = { prompt: el.prompt.value, preview: true };
  if (el.negative.value.trim()) body.negative_prompt = el.negative.value;
  const number = (input) => (input.value.trim() === '' ? undefined : Number(input.value));
  const fields = { steps: el.steps, guidance_scale: el.guidance, n: el.n };
  for (const [field, input] of Object.entries(fields)) {
    const value = number(input);
    if (value !== undefined) body[field] = value;
  }
  if (el.size.value) [body.width, body.height] = el.size.value.split('x').map(Number);
  if (!el.seedLock.checked || el.seed.value.trim() === '') el.seed.value = String(randomSeed(body.n));
  body.seed = Number(el.seed.value);
  if (inputImage) {
    body.image = inputImage;
    body.strength = Number(el.strength.value);
  }
  return body;
}

// Shows a request in the form (what "same again" and "vary seed" run).
function fillForm(body) {
  el.prompt.value = body.prompt;
  el.negative.value = body.negative_prompt || '';
  el.steps.value = body.steps ?? '';
  el.guidance.value = body.guidance_scale ?? '';
  el.n.value = body.n ?? 1;
  if (body.width && body.height) el.size.value = `${body.width}x${body.height}`;
  el.seed.value = body.seed;
  setImage(body.image || null);
  if (body.strength !== undefined) setStrength(body.strength);
}

async function run(body) {
  if (current) return;
  clearErrors();
  current = { id: null, controller: new AbortController(), cancelRequested: false };
  setRunning(true);
  el.progress.removeAttribute('value'); // indeterminate until the first step
  el.progress.dataset.events = '0';
  delete el.progress.dataset.steps;
  el.preview.hidden = true;
  el.preview.removeAttribute('src');
  setStatus('submitting', 'Submitting…');
  delete el.status.dataset.jobId;
  try {
    const response = await api('POST', 'v1/generate', {
      body, headers: { Prefer: 'respond-async' }, signal: current.controller.signal,
    });
    const accepted = await response.json();
    current.id = accepted.id;
    el.status.dataset.jobId = accepted.id;
    onStatus(accepted);
    if (current.cancelRequested) await requestCancel();
    const { event, job } = await follow(accepted.id, current.controller.signal);
    if (event === 'result') {
      el.progress.max = 1;
      el.progress.value = 1;
      const seconds = job.result.timings?.total_s;
      const count = job.result.data.length;
      setStatus('succeeded', `Done: ${count} image${count === 1 ? '' : 's'}` +
        (seconds === undefined ? '.' : ` in ${seconds.toFixed(2)} s.`));
      addResults(job, body);
    } else if (event === 'canceled') {
      if (!el.progress.hasAttribute('value')) el.progress.value = 0;
      setStatus('canceled', 'Canceled.');
    } else {
      el.progress.value = 0;
      setStatus('failed', 'Failed.');
      showError(job.error || job);
    }
  } catch (error) {
    el.progress.value = 0;
    setStatus('failed', error.status === 401 || error.status === 403 ? 'Needs an API key.' : 'Failed.');
    showError(error);
  } finally {
    current = null;
    setRunning(false);
    document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
  }
}

// Follows a job's events until its final one (result, canceled or error); reconnects if the stream drops.
async function follow(id, signal) {
  for (let attempt = 0; attempt < 5; attempt += 1) {
    const response = await api('GET', `v1/jobs/${id}/events`, { headers: { Accept: 'text/event-stream' }, signal });
    for await (const { event, data } of serverEvents(response)) {
      const payload = JSON.parse(data);
      if (event === 'status') onStatus(payload);
      else if (event === 'progress') onProgress(payload);
      else if (['result', 'canceled', 'error'].includes(event)) return { event, job: payload };
    }
    await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
  }
  throw new Error(`lost the event stream of job ${id}; GET /v1/jobs/${id} has its state`);
}

async function requestCancel() {
  if (!current) return;
  current.cancelRequested = true;
  setStatus('canceling', 'Canceling…');
  if (current.id) await api('DELETE', `v1/jobs/${current.id}`);
}

// ---- results

function addResults(job, body) {
  const request = job.request || {};
  const width = request.width ?? body.width;
  const height = request.height ?? body.height;
  const items = job.result.data.map((image) => resultItem(image, { ...body, n: 1, seed: image.seed }, width, height,
    request));
  el.results.prepend(...items);
  // Each result holds its image in memory: keep the newest ones.
  while (el.results.children.length > MAX_RESULTS) el.results.lastElementChild.remove();
  el.noResults.hidden = true;
}

function resultItem(image, own, width, height, request) {
  const url = `data:image/png;base64,${image.b64_json}`;
  const li = document.createElement('li');
  li.dataset.seed = String(image.seed);
  const figure = document.createElement('figure');
  const img = document.createElement('img');
  img.src = url;
  img.alt = `${own.prompt} (seed ${image.seed})`;
  if (width && height) Object.assign(img, { width, height });
  const caption = document.createElement('figcaption');
  const steps = request.steps ?? own.steps;
  caption.textContent = [`Seed ${image.seed}`, width && `${width}×${height}`, steps && `${steps} steps`,
    own.image && `image to image, strength ${own.strength}`].filter(Boolean).join(' · ');
  const tools = document.createElement('div');
  tools.className = 'tools';
  const same = button('Same again', `Make this image again (seed ${image.seed})`, () => {
    fillForm(own);
    el.seedLock.checked = true;
    run(own);
  });
  const vary = button('Vary seed', 'The same request with a new random seed', () => {
    const varied = { ...own, seed: randomSeed(1) };
    fillForm(varied);
    run(varied);
  });
  const download = document.createElement('a');
  download.className = 'button';
  download.href = url;
  download.download = `snapgen-${image.seed}.png`;
  download.textContent = 'Download';
  download.setAttribute('aria-label', `Download the image of seed ${image.seed}`);
  tools.append(same, vary, download);
  figure.append(img, caption, tools);
  li.append(figure);
  return li;
}

function button(text, title, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = text;
  b.title = title;
  b.addEventListener('click', onClick);
  return b;
}

// ---- image to image

function setStrength(value) {
  el.strength.value = String(value);
  el.strengthValue.textContent = Number(el.strength.value).toFixed(2);
}

function setImage(dataUrl) {
  inputImage = dataUrl;
  el.imageChosen.hidden = !dataUrl;
  if (dataUrl) el.imageThumb.src = dataUrl;
  else {
    el.imageThumb.removeAttribute('src');
    el.imageFile.value = '';
  }
}

function loadImage(file) {
  if (!file || el.img2img.disabled) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    showError({ message: `${file.name} is not a PNG, JPEG or WebP image`, field: 'image' });
    return;
  }
  clearErrors();
  const reader = new FileReader();
  reader.addEventListener('load', () => setImage(reader.result));
  reader.addEventListener('error', () => showError({ message: `could not read ${file.name}`, field: 'image' }));
  reader.readAsDataURL(file);
}

// ---- the model, the key, the bundles

async function loadModel() {
  let list;
  try {
    list = await (await api('GET', 'v1/models')).json();
  } catch (error) {
    el.modelInfo.textContent = error.status === 401 || error.status === 403 ? 'Enter the API key to start.' : '';
    showError(error);
    return;
  }
  model = list.data[0] || null;
  if (!model) {
    el.modelInfo.textContent = 'Waiting for a worker to describe its model…';
    setTimeout(loadModel, 2000);
    return;
  }
  el.size.replaceChildren(...model.sizes.map(([w, h]) => new Option(`${w} × ${h}`, `${w}x${h}`)));
  el.size.value = model.default_size.join('x');
  el.steps.max = String(model.max_steps);
  if (el.steps.value === '') el.steps.value = String(model.default_steps);
  if (el.guidance.value === '') el.guidance.value = String(model.guidance_scale);
  el.n.max = String(model.max_n);
  // A model without an encoder refuses an input image: say so here rather than after a request.
  const imageInput = model.image_input !== false;
  el.img2img.disabled = !imageInput;
  el.imageHelp.textContent = imageInput ? 'Or drop a PNG, JPEG or WebP anywhere on the page.'
    : `The model ${model.id} cannot start from an image (it has no encoder).`;
  if (!imageInput) setImage(null);
  el.modelInfo.textContent = `Model ${model.id}: ${model.default_steps} steps by default (at most ` +
    `${model.max_steps}), guidance ${model.guidance_scale}.`;
}

function askForKey() {
  el.keyForm.hidden = false;
  el.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || '';
  el.apiKey.focus();
}

function humanSize(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

async function loadBundles() {
  let bundles;
  try {
    bundles = (await (await api('GET', 'v1/models/mobile')).json()).data;
  } catch (error) {
    el.bundlesEmpty.textContent = `Could not list the bundles: ${error.message}`;
    return;
  }
  el.bundles.replaceChildren(...bundles.map((bundle) => {
    const li = document.createElement('li');
    const link = document.createElement('a');
    link.href = bundle.url;
    link.textContent = bundle.name;
    link.addEventListener('click', (event) => downloadWithKey(event, bundle));
    const hash = document.createElement('code');
    hash.textContent = bundle.sha256;
    const version = bundle.version ? ` ${bundle.version}` : '';
    li.append(link, `${version} · ${humanSize(bundle.size)} · sha256 `, hash);
    return li;
  }));
  el.bundlesEmpty.hidden = bundles.length > 0;
  el.bundlesEmpty.textContent = 'This server has no Core ML bundles (SNAPGEN_MOBILE_DIR).';
}

// A plain link cannot carry the key: with one, fetch the bundle and save it from memory.
async function downloadWithKey(event, bundle) {
  if (!sessionStorage.getItem(KEY_STORAGE)) return;
  event.preventDefault();
  try {
    const blob = await (await api('GET', new URL(bundle.url).pathname)).blob();
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = bundle.name;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
  } catch (error) {
    showError(error);
  }
}

// ---- wiring

el.generateForm.addEventListener('submit', (event) => {
  event.preventDefault();
  if (!current) run(formBody());
});
el.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    el.generateForm.requestSubmit();
  }
});
el.cancel.addEventListener('click', () => requestCancel().catch(showError));
el.seedRandom.addEventListener('click', () => {
  el.seed.value = String(randomSeed(el.n.value));
});
el.seed.addEventListener('input', () => {
  el.seedLock.checked = true; // a seed typed in is meant to be kept
});
el.strength.addEventListener('input', () => setStrength(el.strength.value));
el.imageFile.addEventListener('change', () => loadImage(el.imageFile.files[0]));
el.imageClear.addEventListener('click', () => setImage(null));
document.addEventListener('dragover', (event) => {
  if (!event.dataTransfer?.types.includes('Files')) return;
  event.preventDefault();
  document.body.classList.add('dragging');
});
document.addEventListener('dragleave', (event) => {
  if (!event.relatedTarget) document.body.classList.remove('dragging');
});
document.addEventListener('drop', (event) => {
  if (!event.dataTransfer?.files.length) return;
  event.preventDefault();
  document.body.classList.remove('dragging');
  loadImage(event.dataTransfer.files[0]);
});
el.keyForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const key = el.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  clearErrors();
  el.keyForm.hidden = true;
  loadModel();
  loadBundles();
  el.prompt.focus();
});

setStrength(el.strength.value);
loadModel();
loadBundles();
