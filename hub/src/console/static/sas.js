// Credentials of the console: a bearer token as pasted, or a shared access policy's
// connection string, from which short SAS tokens are signed here with WebCrypto (the
// key never leaves the page). Azure's service SAS: sig = base64(HMAC-SHA256(
// base64decode(key), urlencode(host) + "\n" + expiry)).

const TTL_SECS = 3600;

export function parseConnectionString(text) {
  const fields = {};
  for (const part of text.trim().split(';')) {
    const at = part.indexOf('=');
    if (at > 0) fields[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  if (!fields.HostName || !fields.SharedAccessKeyName || !fields.SharedAccessKey) {
    throw new Error('a connection string needs HostName, SharedAccessKeyName and SharedAccessKey');
  }
  return { host: fields.HostName, policy: fields.SharedAccessKeyName, key: fields.SharedAccessKey };
}

function decodeBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function encodeBase64(buffer) {
  let raw = '';
  for (const byte of new Uint8Array(buffer)) raw += String.fromCharCode(byte);
  return btoa(raw);
}

export async function signSas({ host, policy, key }, nowSecs = Math.floor(Date.now() / 1000)) {
  const expiry = nowSecs + TTL_SECS;
  const resource = encodeURIComponent(host);
  const cryptoKey = await crypto.subtle.importKey(
    'raw', decodeBase64(key), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  const signature = await crypto.subtle.sign(
    'HMAC', cryptoKey, new TextEncoder().encode(`${resource}\n${expiry}`));
  const sig = encodeURIComponent(encodeBase64(signature));
  return {
    header: `SharedAccessSignature sr=${resource}&sig=${sig}&se=${expiry}&skn=${encodeURIComponent(policy)}`,
    expiresAt: expiry,
  };
}

// What the console keeps in sessionStorage: the kind and the pasted text (a token, or
// the connection string, which must stay in the page to sign later tokens).
export class Credential {
  constructor(kind, secret) {
    this.kind = kind;
    this.secret = secret;
    this.cached = null;
    if (kind === 'connection-string') this.parsed = parseConnectionString(secret);
  }

  static fromInput(text) {
    const trimmed = text.trim();
    if (!trimmed) throw new Error('paste a token or a connection string');
    if (/HostName=/i.test(trimmed)) return new Credential('connection-string', trimmed);
    return new Credential('token', trimmed.replace(/^Bearer\s+/i, ''));
  }

  // The Authorization header value for the next request.
  async authorization() {
    if (this.kind === 'token') return `Bearer ${this.secret}`;
    const now = Math.floor(Date.now() / 1000);
    if (!this.cached || this.cached.expiresAt - now < 300) this.cached = await signSas(this.parsed, now);
    return this.cached.header;
  }

  // A description for the header bar (never the secret).
  describe() {
    return this.kind === 'token' ? 'bearer token' : `policy ${this.parsed.policy}`;
  }
}

// The WebSocket subprotocol carrying the credential (browsers cannot set headers on a
// WebSocket): `hub.auth.` + base64url of the Authorization header value.
export function authProtocol(authorization) {
  const bytes = new TextEncoder().encode(authorization);
  return `hub.auth.${encodeBase64(bytes).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '')}`;
}
