// The hub's web console: one ES module, hash routes, the REST API and the telemetry
// WebSocket. Device-supplied strings only ever become text nodes (el() below never
// parses HTML). Errors are collected in window.__consoleErrors for the browser test.

import { Credential, authProtocol } from './sas.js';

window.__consoleErrors = [];
window.addEventListener('error', (event) => window.__consoleErrors.push(String(event.message)));
window.addEventListener('unhandledrejection', (event) => window.__consoleErrors.push(String(event.reason)));

const STORAGE_KEY = 'hub-console-credential';
const main = document.getElementById('main');
const who = document.getElementById('who');
let credential = null;
let teardown = [];

// ---------- DOM ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'testid') node.dataset.testid = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(...nodes) {
  for (const stop of teardown) stop();
  teardown = [];
  main.replaceChildren(...nodes);
  document.body.dataset.ready = '1';
}

function notice(text, kind = 'error') {
  return el('p', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status', testid: `notice-${kind}` }, text);
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { ...headers, Authorization: await credential.authorization() } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let parsed = null;
  if (text) {
    try { parsed = JSON.parse(text); } catch { parsed = text; }
  }
  // An expired credential signs out; a 401 for a permission the credential lacks (a
  // policy without provisioning rights, say) is shown where it happened.
  if (response.status === 401 && parsed && parsed.errorCode === 401003) {
    signOut(`signed out: ${parsed.message}`);
    throw new ApiError(401, parsed);
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return { body: parsed, headers: response.headers, status: response.status };
}

// ---------- sign-in ----------

function signInView(message = signedOutMessage) {
  signedOutMessage = null;
  const input = el('textarea', { id: 'credential', rows: 4, testid: 'credential', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'eyJ… (hub token) or HostName=…;SharedAccessKeyName=…;SharedAccessKey=…' });
  const error = el('div');
  const form = el('form', {
    class: 'card signin',
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        const candidate = Credential.fromInput(input.value);
        credential = candidate;
        await api('GET', '/statistics/devices');
        sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ kind: candidate.kind, secret: candidate.secret }));
        renderHeader();
        location.hash = '#/';
        route();
      } catch (err) {
        credential = null;
        error.replaceChildren(notice(`cannot sign in: ${err.message}`));
      }
    },
  },
  el('h1', {}, 'Sign in'),
  el('p', {}, 'Paste a service token (', el('code', {}, 'hub token --scope registry:read,registry:write,service:connect'),
    ') or a shared access policy connection string (', el('code', {}, 'hub connection-string'),
    '). A connection string stays in this tab: the page signs short tokens with it and never sends the key.'),
  el('label', { for: 'credential' }, 'Token or connection string'), input,
  el('button', { type: 'submit', testid: 'sign-in' }, 'Sign in'),
  message ? notice(message, 'info') : null,
  error);
  show(form);
  input.focus();
}

// Shown on the sign-in page after a sign-out (the hash change re-renders it).
let signedOutMessage = null;

function signOut(message) {
  sessionStorage.removeItem(STORAGE_KEY);
  credential = null;
  signedOutMessage = message;
  renderHeader();
  if (location.hash && location.hash !== '#/') location.hash = '#/';
  else route();
}

function renderHeader() {
  const nav = document.getElementById('nav');
  if (!credential) {
    nav.hidden = true;
    who.replaceChildren();
    return;
  }
  nav.hidden = false;
  who.replaceChildren(el('span', { class: 'muted' }, credential.describe()), ' ',
    el('button', { type: 'button', class: 'link', testid: 'sign-out', onclick: () => signOut('signed out') }, 'Sign out'));
}

// ---------- overview ----------

function parseMetrics(text) {
  const values = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const name = match[1];
    values[name] = (values[name] || 0) + Number(match[3]);
  }
  return values;
}

function sparkline(points, label) {
  const width = 320;
  const height = 64;
  const svgNs = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(svgNs, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  svg.classList.add('spark');
  const max = Math.max(1, ...points);
  const step = points.length > 1 ? width / (points.length - 1) : width;
  const path = points.map((value, i) => `${i ? 'L' : 'M'}${(i * step).toFixed(1)},${(height - 2 - (value / max) * (height - 4)).toFixed(1)}`).join(' ');
  const line = document.createElementNS(svgNs, 'path');
  line.setAttribute('d', path || `M0,${height - 2}`);
  svg.append(line);
  return svg;
}

function overviewView() {
  const devices = el('strong', { testid: 'device-count' }, '…');
  const enabled = el('span', { class: 'muted' });
  const connected = el('strong', { testid: 'connected-count' }, '…');
  const rate = el('strong', { testid: 'msg-rate' }, '…');
  const commit = el('strong', {}, '…');
  const rateChart = el('div');
  const commitChart = el('div');
  const error = el('div');
  const history = { rate: [], commit: [] };
  let last = null;
  const tick = async () => {
    try {
      const stats = await api('GET', '/statistics/devices');
      devices.textContent = stats.body.totalDeviceCount;
      enabled.textContent = ` (${stats.body.enabledDeviceCount} enabled)`;
      const metrics = parseMetrics(await (await fetch('/metrics')).text());
      connected.textContent = metrics.hub_mqtt_connections_open ?? 0;
      const now = performance.now();
      if (last) {
        const secs = (now - last.at) / 1000;
        const messages = (metrics.hub_messages_in_total ?? 0) - (last.metrics.hub_messages_in_total ?? 0);
        const commits = (metrics.hub_telemetry_commit_seconds_count ?? 0) - (last.metrics.hub_telemetry_commit_seconds_count ?? 0);
        const commitSecs = (metrics.hub_telemetry_commit_seconds_sum ?? 0) - (last.metrics.hub_telemetry_commit_seconds_sum ?? 0);
        const perSec = Math.max(0, messages / secs);
        const commitMs = commits > 0 ? (commitSecs / commits) * 1000 : 0;
        rate.textContent = perSec.toFixed(1);
        commit.textContent = `${commitMs.toFixed(2)} ms`;
        history.rate = [...history.rate, perSec].slice(-60);
        history.commit = [...history.commit, commitMs].slice(-60);
        rateChart.replaceChildren(sparkline(history.rate, 'telemetry messages per second'));
        commitChart.replaceChildren(sparkline(history.commit, 'mean commit latency'));
      }
      last = { at: now, metrics };
      error.replaceChildren();
    } catch (err) {
      error.replaceChildren(notice(err.message));
    }
  };
  const timer = setInterval(tick, 2000);
  show(el('h1', {}, 'Overview'), error,
    el('div', { class: 'grid' },
      el('section', { class: 'card' }, el('h2', {}, 'Devices'), devices, enabled),
      el('section', { class: 'card' }, el('h2', {}, 'Connected now'), connected),
      el('section', { class: 'card' }, el('h2', {}, 'Telemetry msgs/s'), rate, rateChart),
      el('section', { class: 'card' }, el('h2', {}, 'Commit latency'), commit, commitChart)));
  teardown.push(() => clearInterval(timer));
  tick();
}

// ---------- devices ----------

const PAGE = 20;

function deviceRow(device, refresh) {
  const enabled = device.status === 'enabled';
  return el('tr', { testid: `device-row-${device.deviceId}` },
    el('td', {}, el('a', { href: `#/devices/${encodeURIComponent(device.deviceId)}` }, device.deviceId)),
    el('td', {}, device.status),
    el('td', {}, device.connectionState || ''),
    el('td', {}, device.authentication ? device.authentication.type : ''),
    el('td', { class: 'actions' },
      el('button', { type: 'button', onclick: async () => {
        await setStatus(device, enabled ? 'disabled' : 'enabled');
        refresh();
      } }, enabled ? 'Disable' : 'Enable'),
      el('button', { type: 'button', class: 'danger', testid: `delete-${device.deviceId}`, onclick: async () => {
        if (!window.confirm(`Delete ${device.deviceId}?`)) return;
        await api('DELETE', `/devices/${encodeURIComponent(device.deviceId)}`, { headers: { 'If-Match': '*' } });
        refresh();
      } }, 'Delete')));
}

async function setStatus(device, status) {
  const current = (await api('GET', `/devices/${encodeURIComponent(device.deviceId)}`)).body;
  await api('PUT', `/devices/${encodeURIComponent(device.deviceId)}`, {
    body: { ...current, status },
    headers: { 'If-Match': current.etag },
  });
}

function devicesView() {
  const rows = el('tbody');
  const pager = el('div', { class: 'pager' });
  const error = el('div');
  const continuations = [null];
  let page = 0;
  const load = async () => {
    try {
      const headers = { 'x-ms-max-item-count': String(PAGE) };
      if (continuations[page]) headers['x-ms-continuation'] = continuations[page];
      const answer = await api('GET', '/devices', { headers });
      const next = answer.headers.get('x-ms-continuation');
      continuations[page + 1] = next;
      rows.replaceChildren(...answer.body.map((device) => deviceRow(device, load)));
      pager.replaceChildren(
        el('button', { type: 'button', disabled: page === 0, onclick: () => { page -= 1; load(); } }, 'Previous'),
        el('span', { class: 'muted' }, ` page ${page + 1} `),
        el('button', { type: 'button', disabled: !next, onclick: () => { page += 1; load(); } }, 'Next'));
      error.replaceChildren();
      document.body.dataset.ready = '1';
    } catch (err) {
      error.replaceChildren(notice(err.message));
    }
  };
  const newId = el('input', { id: 'new-device', testid: 'new-device', required: true, maxlength: 128, placeholder: 'sensor-1' });
  const create = el('form', { class: 'inline', onsubmit: async (event) => {
    event.preventDefault();
    try {
      await api('PUT', `/devices/${encodeURIComponent(newId.value.trim())}`, { body: { authentication: { type: 'sas' } } });
      const id = newId.value.trim();
      newId.value = '';
      location.hash = `#/devices/${encodeURIComponent(id)}`;
    } catch (err) {
      error.replaceChildren(notice(err.message));
    }
  } }, el('label', { for: 'new-device' }, 'New device id'), newId, el('button', { type: 'submit', testid: 'create-device' }, 'Create'));
  show(el('h1', {}, 'Devices'), create, error,
    el('div', { class: 'scroll' }, el('table', {},
      el('thead', {}, el('tr', {}, el('th', {}, 'Device'), el('th', {}, 'Status'), el('th', {}, 'Connection'), el('th', {}, 'Auth'), el('th', {}, ''))),
      rows)), pager);
  load();
}

// ---------- query ----------

function queryView() {
  const box = el('textarea', { id: 'query', rows: 3, testid: 'query', spellcheck: 'false' }, "SELECT * FROM devices WHERE tags.site = 'oslo'");
  const output = el('div', { testid: 'query-result' });
  const run = async (event) => {
    event.preventDefault();
    try {
      const answer = await api('POST', '/devices/query', { body: { query: box.value } });
      const items = Array.isArray(answer.body) ? answer.body : [];
      output.replaceChildren(el('p', { class: 'muted', testid: 'query-count' }, `${items.length} result(s)`),
        el('ul', { class: 'results' }, items.map((item) => el('li', {},
          item.deviceId ? el('a', { href: `#/devices/${encodeURIComponent(item.deviceId)}` }, item.deviceId) : null,
          el('pre', {}, JSON.stringify(item, null, 2))))));
    } catch (err) {
      output.replaceChildren(notice(err.message));
    }
  };
  show(el('h1', {}, 'Query'), el('form', { onsubmit: run }, el('label', { for: 'query' }, 'Twin query'), box,
    el('button', { type: 'submit', testid: 'run-query' }, 'Run')), output);
}

// ---------- one device ----------

function copyButton(text, label) {
  return el('button', { type: 'button', onclick: () => navigator.clipboard && navigator.clipboard.writeText(text) }, label);
}

async function deviceView(id) {
  const path = encodeURIComponent(id);
  const error = el('div');
  show(el('h1', {}, el('a', { href: '#/devices' }, 'Devices'), ' / ', id), error, el('p', { class: 'muted' }, 'loading…'));
  let device;
  try {
    device = (await api('GET', `/devices/${path}`)).body;
  } catch (err) {
    show(el('h1', {}, id), notice(err.message));
    return;
  }
  const sections = [identitySection(device), twinSection(id), telemetrySection(id), methodSection(id), c2dSection(id)];
  show(el('h1', {}, el('a', { href: '#/devices' }, 'Devices'), ' / ', id), error, ...sections);
}

function identitySection(device) {
  const keys = device.authentication && device.authentication.symmetricKey;
  const hostName = credential.kind === 'connection-string' ? credential.parsed.host : location.hostname;
  const items = [
    el('dt', {}, 'Status'), el('dd', { testid: 'device-status' }, device.status, device.statusReason ? ` (${device.statusReason})` : ''),
    el('dt', {}, 'Connection'), el('dd', {}, device.connectionState || 'Disconnected'),
    el('dt', {}, 'Last activity'), el('dd', {}, device.lastActivityTime || '—'),
    el('dt', {}, 'Authentication'), el('dd', {}, device.authentication ? device.authentication.type : '—'),
    el('dt', {}, 'Queued C2D'), el('dd', {}, device.cloudToDeviceMessageCount ?? 0),
  ];
  if (keys && keys.primaryKey) {
    const connectionString = `HostName=${hostName};DeviceId=${device.deviceId};SharedAccessKey=${keys.primaryKey}`;
    items.push(el('dt', {}, 'Primary key'), el('dd', {}, el('code', {}, keys.primaryKey), ' ', copyButton(keys.primaryKey, 'Copy')),
      el('dt', {}, 'Connection string'), el('dd', {}, el('code', { testid: 'device-connection-string' }, connectionString), ' ',
        copyButton(connectionString, 'Copy')));
  }
  return el('section', { class: 'card' }, el('h2', {}, 'Identity'), el('dl', {}, items));
}

function twinSection(id) {
  const path = encodeURIComponent(id);
  const editor = el('textarea', { id: 'twin-editor', rows: 12, testid: 'twin-editor', spellcheck: 'false' });
  const status = el('div', { testid: 'twin-status' });
  const reported = el('pre', { testid: 'twin-reported' });
  let etag = null;
  const load = async () => {
    const twin = (await api('GET', `/twins/${path}`)).body;
    etag = twin.etag;
    const strip = (section) => Object.fromEntries(Object.entries(section || {}).filter(([key]) => !key.startsWith('$')));
    editor.value = JSON.stringify({ tags: twin.tags || {}, properties: { desired: strip(twin.properties.desired) } }, null, 2);
    reported.textContent = JSON.stringify(strip(twin.properties.reported), null, 2);
    status.replaceChildren(el('span', { class: 'muted' }, `etag ${etag}, version ${twin.version}`));
  };
  const save = async (event) => {
    event.preventDefault();
    let body;
    try {
      body = JSON.parse(editor.value);
    } catch (err) {
      status.replaceChildren(notice(`not JSON: ${err.message}`));
      return;
    }
    try {
      await api('PUT', `/twins/${path}`, { body, headers: { 'If-Match': etag } });
      await load();
      status.prepend(notice('saved', 'info'));
    } catch (err) {
      if (err.status === 412) {
        status.replaceChildren(notice('the twin changed since you loaded it: reload to see the current twin, then apply your change again', 'error'),
          el('button', { type: 'button', testid: 'twin-reload', onclick: () => load() }, 'Reload'));
      } else {
        status.replaceChildren(notice(err.message));
      }
    }
  };
  load().catch((err) => status.replaceChildren(notice(err.message)));
  return el('section', { class: 'card' }, el('h2', {}, 'Twin'),
    el('form', { onsubmit: save }, el('label', { for: 'twin-editor' }, 'Tags and desired properties'), editor,
      el('button', { type: 'submit', testid: 'twin-save' }, 'Save (If-Match)')), status,
    el('h3', {}, 'Reported'), reported);
}

// A stored message's body as text: JSON bodies (declared JSON content type) as JSON,
// others arrive base64-encoded and are shown decoded when they are UTF-8.
function bodyText(message) {
  const contentType = (message.systemProperties || {})['content-type'] || '';
  if (typeof message.body !== 'string' || contentType.toLowerCase().includes('json')) return JSON.stringify(message.body);
  try {
    const raw = atob(message.body);
    const bytes = Uint8Array.from(raw, (c) => c.charCodeAt(0));
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return `base64:${message.body}`;
  }
}

function telemetrySection(id) {
  const list = el('ol', { class: 'telemetry', testid: 'telemetry', reversed: true });
  const state = el('span', { class: 'muted', testid: 'telemetry-state' }, 'stopped');
  const from = el('select', { id: 'telemetry-from', testid: 'telemetry-from' },
    el('option', { value: 'latest' }, 'from now'), el('option', { value: 'earliest' }, 'from the earliest retained'),
    el('option', { value: 'time' }, 'from a time'));
  const at = el('input', { type: 'datetime-local', id: 'telemetry-at', hidden: true });
  from.addEventListener('change', () => { at.hidden = from.value !== 'time'; });
  const received = [];
  let sockets = [];
  let paused = false;
  const stop = () => {
    for (const socket of sockets) socket.close();
    sockets = [];
    state.textContent = 'stopped';
  };
  teardown.push(stop);
  const add = (message) => {
    if (message.deviceId !== id) return;
    if (from.value === 'time' && at.value && new Date(message.enqueuedTime) < new Date(at.value)) return;
    received.push(message);
    if (paused) return;
    const body = bodyText(message);
    list.prepend(el('li', {}, el('span', { class: 'muted' }, `${message.enqueuedTime} #${message.offset} `),
      el('code', { class: 'body' }, body),
      Object.keys(message.properties || {}).length ? el('span', { class: 'muted' }, ` ${JSON.stringify(message.properties)}`) : null));
    while (list.childElementCount > 200) list.lastElementChild.remove();
  };
  const start = async () => {
    stop();
    try {
      const info = (await api('GET', '/streams/telemetry')).body;
      const start = from.value === 'latest' ? 'latest' : 'earliest';
      const protocol = authProtocol(await credential.authorization());
      const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
      for (const partition of info.partitions) {
        const socket = new WebSocket(`${scheme}://${location.host}/streams/telemetry/partitions/${partition.id}/ws?from=${start}`, ['hub.v1', protocol]);
        socket.addEventListener('message', (event) => {
          try { add(JSON.parse(event.data)); } catch (err) { window.__consoleErrors.push(`bad telemetry frame: ${err}`); }
        });
        socket.addEventListener('open', () => { state.textContent = paused ? 'paused' : 'live'; });
        socket.addEventListener('close', () => { if (sockets.includes(socket)) state.textContent = 'closed'; });
        sockets.push(socket);
      }
    } catch (err) {
      state.replaceChildren(notice(err.message));
    }
  };
  const exportAll = () => {
    const blob = new Blob([JSON.stringify(received, null, 2)], { type: 'application/json' });
    const link = el('a', { href: URL.createObjectURL(blob), download: `${id}-telemetry.json` });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  };
  return el('section', { class: 'card' }, el('h2', {}, 'Live telemetry'),
    el('div', { class: 'inline' }, el('label', { for: 'telemetry-from' }, 'Start'), from, at,
      el('button', { type: 'button', testid: 'telemetry-start', onclick: start }, 'Watch'),
      el('button', { type: 'button', testid: 'telemetry-pause', onclick: (event) => {
        paused = !paused;
        event.target.textContent = paused ? 'Resume' : 'Pause';
        if (sockets.length) state.textContent = paused ? 'paused' : 'live';
      } }, 'Pause'),
      el('button', { type: 'button', onclick: exportAll }, 'Export JSON'), state),
    list);
}

function methodSection(id) {
  const name = el('input', { id: 'method-name', testid: 'method-name', required: true, value: 'reboot' });
  const payload = el('textarea', { id: 'method-payload', rows: 3, testid: 'method-payload' }, '{}');
  const timeout = el('input', { id: 'method-timeout', type: 'number', min: 5, max: 300, value: 30 });
  const history = el('ol', { class: 'history', testid: 'method-history', reversed: true });
  const invoke = async (event) => {
    event.preventDefault();
    const started = new Date();
    let parsed;
    try {
      parsed = payload.value.trim() ? JSON.parse(payload.value) : null;
    } catch (err) {
      history.prepend(el('li', {}, notice(`payload is not JSON: ${err.message}`)));
      return;
    }
    try {
      const answer = await api('POST', `/twins/${encodeURIComponent(id)}/methods`, {
        body: { methodName: name.value, payload: parsed, responseTimeoutInSeconds: Number(timeout.value), connectTimeoutInSeconds: 0 },
      });
      history.prepend(el('li', { testid: 'method-result' }, `${started.toLocaleTimeString()} ${name.value} → status ${answer.body.status} `,
        el('code', {}, JSON.stringify(answer.body.payload))));
    } catch (err) {
      history.prepend(el('li', { testid: 'method-result' }, `${started.toLocaleTimeString()} ${name.value} → `, notice(err.message)));
    }
  };
  return el('section', { class: 'card' }, el('h2', {}, 'Direct method'),
    el('form', { onsubmit: invoke }, el('label', { for: 'method-name' }, 'Method'), name,
      el('label', { for: 'method-payload' }, 'Payload (JSON)'), payload,
      el('label', { for: 'method-timeout' }, 'Response timeout (s)'), timeout,
      el('button', { type: 'submit', testid: 'method-invoke' }, 'Invoke')), history);
}

function c2dSection(id) {
  const body = el('textarea', { id: 'c2d-body', rows: 3, testid: 'c2d-body' });
  const properties = el('textarea', { id: 'c2d-properties', rows: 2, testid: 'c2d-properties', placeholder: 'key=value, one per line' });
  const ack = el('select', { id: 'c2d-ack' }, ['full', 'positive', 'negative', 'none'].map((mode) => el('option', { value: mode }, mode)));
  const sent = el('ol', { class: 'history', testid: 'c2d-sent', reversed: true });
  const send = async (event) => {
    event.preventDefault();
    const props = {};
    for (const line of properties.value.split('\n')) {
      const at = line.indexOf('=');
      if (at > 0) props[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    try {
      const answer = await api('POST', `/devices/${encodeURIComponent(id)}/messages/deviceBound`, {
        body: { body: body.value, properties: props, ack: ack.value },
      });
      const messageId = answer.body && answer.body.messageId ? answer.body.messageId : '';
      sent.prepend(el('li', { testid: 'c2d-result' }, `queued ${messageId} (ack ${ack.value}; feedback goes to the service feedback queue)`));
    } catch (err) {
      sent.prepend(el('li', { testid: 'c2d-result' }, notice(err.message)));
    }
  };
  return el('section', { class: 'card' }, el('h2', {}, 'Cloud-to-device message'),
    el('form', { onsubmit: send }, el('label', { for: 'c2d-body' }, 'Body'), body,
      el('label', { for: 'c2d-properties' }, 'Properties'), properties,
      el('label', { for: 'c2d-ack' }, 'Feedback'), ack,
      el('button', { type: 'submit', testid: 'c2d-send' }, 'Send')), sent);
}

// ---------- provisioning ----------

function provisioningView() {
  const groups = el('tbody', { testid: 'groups' });
  const individuals = el('tbody', { testid: 'enrollments' });
  const registrations = el('div', { testid: 'registrations' });
  const error = el('div');
  const showRegistrations = async (group) => {
    try {
      const answer = await api('POST', `/registrations/${encodeURIComponent(group)}/query`, { body: {} });
      const items = Array.isArray(answer.body) ? answer.body : [];
      registrations.replaceChildren(el('h3', {}, `Registrations through ${group}`),
        items.length ? el('ul', { class: 'results' }, items.map((item) => el('li', {},
          el('a', { href: `#/devices/${encodeURIComponent(item.deviceId || item.registrationId)}` }, item.registrationId),
          ` ${item.status}${item.substatus ? ` (${item.substatus})` : ''} ${item.lastUpdatedDateTimeUtc || ''}`)))
          : el('p', { class: 'muted' }, 'none yet'));
    } catch (err) {
      registrations.replaceChildren(notice(err.message));
    }
  };
  const row = (kind, enrollment, refresh) => {
    const id = kind === 'group' ? enrollment.enrollmentGroupId : enrollment.registrationId;
    const path = kind === 'group' ? '/enrollmentGroups/' : '/enrollments/';
    const enabled = enrollment.provisioningStatus !== 'disabled';
    const attestation = enrollment.attestation ? enrollment.attestation.type : '';
    return el('tr', { testid: `${kind}-row-${id}` },
      el('td', {}, id), el('td', {}, attestation), el('td', {}, enrollment.provisioningStatus || 'enabled'),
      el('td', { class: 'actions' },
        kind === 'group' ? el('button', { type: 'button', onclick: () => showRegistrations(id) }, 'Registrations') : null,
        el('button', { type: 'button', onclick: async () => {
          try {
            await api('PUT', `${path}${encodeURIComponent(id)}`, {
              body: { ...enrollment, provisioningStatus: enabled ? 'disabled' : 'enabled' },
              headers: { 'If-Match': enrollment.etag },
            });
            refresh();
          } catch (err) { error.replaceChildren(notice(err.message)); }
        } }, enabled ? 'Disable' : 'Enable'),
        el('button', { type: 'button', class: 'danger', onclick: async () => {
          if (!window.confirm(`Delete ${id}?`)) return;
          try {
            await api('DELETE', `${path}${encodeURIComponent(id)}`, { headers: { 'If-Match': '*' } });
            refresh();
          } catch (err) { error.replaceChildren(notice(err.message)); }
        } }, 'Delete')));
  };
  const load = async () => {
    try {
      const [g, i] = await Promise.all([
        api('POST', '/enrollmentGroups/query', { body: { query: '*' } }),
        api('POST', '/enrollments/query', { body: { query: '*' } }),
      ]);
      groups.replaceChildren(...(g.body || []).map((group) => row('group', group, load)));
      individuals.replaceChildren(...(i.body || []).map((one) => row('individual', one, load)));
      error.replaceChildren();
      document.body.dataset.ready = '1';
    } catch (err) {
      error.replaceChildren(notice(err.status === 401 || err.status === 403
        ? `${err.message} (the provisioning pages need provisioning:read and provisioning:write, or the provisioningserviceowner policy)`
        : err.message));
    }
  };
  const newGroup = el('input', { id: 'new-group', testid: 'new-group', required: true, maxlength: 128, placeholder: 'factory-a' });
  const create = el('form', { class: 'inline', onsubmit: async (event) => {
    event.preventDefault();
    const id = newGroup.value.trim();
    try {
      await api('PUT', `/enrollmentGroups/${encodeURIComponent(id)}`, {
        body: { enrollmentGroupId: id, attestation: { type: 'symmetricKey' }, provisioningStatus: 'enabled' },
      });
      newGroup.value = '';
      load();
    } catch (err) {
      error.replaceChildren(notice(err.message));
    }
  } }, el('label', { for: 'new-group' }, 'New symmetric-key enrollment group'), newGroup,
  el('button', { type: 'submit', testid: 'create-group' }, 'Create'));
  const table = (body) => el('div', { class: 'scroll' }, el('table', {},
    el('thead', {}, el('tr', {}, el('th', {}, 'Id'), el('th', {}, 'Attestation'), el('th', {}, 'Status'), el('th', {}, ''))), body));
  show(el('h1', {}, 'Provisioning'), create, error,
    el('section', { class: 'card' }, el('h2', {}, 'Enrollment groups'), table(groups), registrations),
    el('section', { class: 'card' }, el('h2', {}, 'Individual enrollments'), table(individuals)));
  load();
}

// ---------- routing ----------

function route() {
  document.body.dataset.ready = '0';
  if (!credential) {
    signInView();
    return;
  }
  const hash = location.hash.replace(/^#/, '') || '/';
  for (const link of document.querySelectorAll('#nav a')) {
    const prefix = link.dataset.prefix;
    const current = hash === link.getAttribute('href').slice(1) || Boolean(prefix && hash.startsWith(prefix));
    link.toggleAttribute('aria-current', current);
  }
  const device = /^\/devices\/(.+)$/.exec(hash);
  if (device) deviceView(decodeURIComponent(device[1]));
  else if (hash === '/devices') devicesView();
  else if (hash === '/query') queryView();
  else if (hash === '/provisioning') provisioningView();
  else overviewView();
}

function restore() {
  const saved = sessionStorage.getItem(STORAGE_KEY);
  if (!saved) return;
  try {
    const { kind, secret } = JSON.parse(saved);
    credential = new Credential(kind, secret);
  } catch {
    sessionStorage.removeItem(STORAGE_KEY);
  }
}

restore();
renderHeader();
window.addEventListener('hashchange', route);
route();
