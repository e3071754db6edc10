// The gateway's HTTP API, and the token that authenticates every call.

const TOKEN_KEY = "sandbox-gateway.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The token lives in sessionStorage: it survives a reload, not the closing of the tab.
export function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function storeToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// `make run` hands a development token over in the URL fragment, which never reaches a server.
export function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(match[1]);
}

// The user a token names, for display only: the gateway verifies it on every call.
export function userOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub ?? null;
  } catch {
    return null;
  }
}

export function describe(error) {
  return error instanceof ApiError ? `${error.message} (${error.code})` : String(error);
}

// A path with its query: withQuery("/api/sandbox/files", { path: "a b" }) -> "/api/sandbox/files?path=a%20b".
export function withQuery(path, query = {}) {
  const pairs = Object.entries(query).filter(([, value]) => value !== undefined && value !== null);
  return pairs.length ? `${path}?${new URLSearchParams(pairs.map(([k, v]) => [k, String(v)]))}` : path;
}

async function errorOf(response) {
  const data = await response.json().catch(() => null);
  const error = data?.error ?? { code: "http_error", message: response.statusText || `HTTP ${response.status}` };
  return new ApiError(response.status, error.code, error.message);
}

// The raw response of a call, for bodies that are not JSON (a file's bytes, an output stream);
// an error status throws the gateway's error envelope as an ApiError.
export async function request(method, path, { body, headers = {}, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${storedToken()}`, ...headers },
    body,
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function call(method, path, body) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const response = await request(method, path, {
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  return response.json();
}

// Browsers cannot set headers on a WebSocket: the token travels as a second subprotocol, which the
// gateway never echoes back (README, "The web terminal").
export function openSocket(path, protocol) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}${path}`, [protocol, `bearer.${storedToken()}`]);
  socket.binaryType = "arraybuffer";
  return socket;
}
