// Wires the page: sign-in, sandbox state, the editor and Run, the terminal and the preview.
import "./style.css";
import { ApiError, call, storeToken, storedToken, takeTokenFromFragment, userOf } from "./api.js";
import { CodeEditor } from "./editor.js";
import { SandboxTerminal } from "./terminal.js";

const $ = (id) => document.getElementById(id);
const STATE_POLL_MS = 10_000;

const editor = new CodeEditor($("editor"), $("language").value);
const terminal = new SandboxTerminal($("terminal"), (status) => ($("terminal-status").textContent = status));
let sandbox = null;

function notify(message) {
  $("notice").textContent = message ?? "";
}

function describe(error) {
  return error instanceof ApiError ? `${error.message} (${error.code})` : String(error);
}

function showSignedIn(token) {
  const user = token ? userOf(token) : null;
  $("sign-in").hidden = Boolean(user);
  $("account").hidden = !user;
  $("user").textContent = user ?? "";
  for (const id of ["run", "connect", "preview-reload", "preview-port", "create-project", "share"]) $(id).disabled = !user;
}

function showSandbox(next) {
  sandbox = next;
  const state = next?.state ?? "none";
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("start").disabled = state === "running";
  $("stop").disabled = state !== "running";
  if (next?.preview_url) $("preview-link").href = next.preview_url;
  $("preview-hint").dataset.state = state;
  if (state === "stopped") $("preview-hint").textContent = "Your sandbox is stopped: Start brings it back with its files.";
}

async function refreshState() {
  if (!storedToken()) return;
  try {
    showSandbox(await call("GET", "/api/sandbox"));
    // After a reload: back to this tab's terminal, whose shell kept running in the sandbox.
    if (sandbox.state === "running" && terminal.storedId && !terminal.socket) terminal.connect(storedToken());
  } catch (error) {
    if (error instanceof ApiError && error.code === "sandbox_not_found") showSandbox(null);
    else if (error instanceof ApiError && error.status === 401) signOut("Your token was refused: sign in again.");
    else notify(describe(error));
  }
}

function signIn(token) {
  storeToken(token);
  showSignedIn(token);
  notify("");
  refreshState();
  showShares().catch(() => {});
}

function signOut(message) {
  terminal.disconnect();
  storeToken(null);
  showSignedIn(null);
  showSandbox(null);
  notify(message);
}

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!userOf(token)) return notify("That does not look like a JWT.");
  $("token").value = "";
  signIn(token);
});

$("sign-out").addEventListener("click", () => signOut(""));

$("start").addEventListener("click", async () => {
  $("start").disabled = true;
  $("state").textContent = "starting";
  try {
    showSandbox(await call("POST", "/api/sandbox"));
    notify("");
    terminal.connect(storedToken());
  } catch (error) {
    notify(describe(error));
    await refreshState();
  }
});

$("stop").addEventListener("click", async () => {
  $("stop").disabled = true;
  try {
    await call("DELETE", "/api/sandbox");
  } catch (error) {
    notify(describe(error));
  }
  await refreshState();
});

$("connect").addEventListener("click", () => terminal.connect(storedToken()));

$("language").addEventListener("change", () => editor.setLanguage($("language").value));

$("run").addEventListener("click", async () => {
  $("run").disabled = true;
  $("run-status").textContent = "running…";
  for (const id of ["stdout", "stderr"]) $(id).textContent = "";
  try {
    const result = await call("POST", "/api/sandbox/exec", { language: $("language").value, code: editor.code });
    $("stdout").textContent = result.stdout;
    $("stderr").textContent = result.stderr;
    const flags = [result.timed_out && "timed out", result.truncated && "output truncated"].filter(Boolean);
    $("run-status").textContent =
      `exit code ${result.exit_code} in ${result.duration_ms} ms` + (flags.length ? ` (${flags.join(", ")})` : "");
    $("run-status").dataset.ok = String(result.exit_code === 0 && !result.timed_out);
  } catch (error) {
    $("run-status").textContent = describe(error);
    $("run-status").dataset.ok = "false";
  } finally {
    $("run").disabled = false;
  }
});

// Browsers send no Authorization header from an iframe: a one-minute login link on the sandbox's own
// preview origin trades for an HttpOnly cookie of that origin, then redirects to the preview itself.
// Another port of the sandbox has an origin (and a cookie) of its own: its login link comes with {port}.
let previewPort = null; // null: 5173, at the sandbox's own origin

async function previewSession() {
  const session = await call("POST", "/api/sandbox/preview-session", previewPort ? { port: previewPort } : undefined);
  return previewPort
    ? { login: session.port_login_url, url: session.port_url }
    : { login: session.login_url, url: session.preview_url };
}

async function showPreview() {
  try {
    const session = await previewSession();
    $("preview").src = session.login;
    $("preview-link").href = session.url;
  } catch (error) {
    notify(describe(error));
  }
  showPorts();
}

// The ports that listen in the sandbox, offered in the preview pane; 5173 is always there.
async function showPorts() {
  let ports = [];
  try {
    ({ ports } = await call("GET", "/api/sandbox/ports"));
  } catch {
    return; // no running sandbox: the list stays as it was
  }
  const options = [new Option("5173", "")];
  for (const { port, process } of ports) {
    if (port === 5173) continue;
    const command = process?.command ? ` ${process.command.split(" ")[0].split("/").pop()}` : "";
    options.push(new Option(`${port}${command}`, String(port)));
  }
  const chosen = previewPort === null ? "" : String(previewPort);
  if (!options.some((option) => option.value === chosen)) options.push(new Option(`${chosen} (closed)`, chosen));
  $("preview-port").replaceChildren(...options);
  $("preview-port").value = chosen;
}

$("preview-reload").addEventListener("click", showPreview);
$("preview-port").addEventListener("focus", showPorts);
$("preview-port").addEventListener("change", () => {
  previewPort = $("preview-port").value ? Number($("preview-port").value) : null;
  showPreview();
});

// A new tab has no cookie of the preview origin until it logs in too: open it through a fresh link.
$("preview-link").addEventListener("click", async (event) => {
  event.preventDefault();
  const tab = window.open("about:blank", "_blank");
  try {
    const session = await previewSession();
    if (tab) tab.location.href = session.login;
  } catch (error) {
    tab?.close();
    notify(describe(error));
  }
});

async function showShares() {
  const { shares } = await call("GET", "/api/sandbox/shares");
  const list = $("share-list");
  list.replaceChildren();
  for (const share of shares) {
    const item = document.createElement("li");
    const until = new Date(share.expires_at).toLocaleString();
    const revoke = document.createElement("button");
    revoke.textContent = "Revoke";
    revoke.className = "quiet";
    revoke.addEventListener("click", async () => {
      await call("DELETE", `/api/sandbox/shares/${encodeURIComponent(share.id)}`);
      $("share-new").hidden = true;
      await showShares();
    });
    item.append(`Share link ${share.id}, until ${until}`, revoke);
    list.append(item);
  }
  $("shares").hidden = shares.length === 0;
}

$("share").addEventListener("click", async () => {
  try {
    const share = await call("POST", "/api/sandbox/shares", { expires_in_s: 86400 });
    $("share-url").value = share.url;
    $("share-new").hidden = false;
    await showShares();
    $("share-url").select();
  } catch (error) {
    notify(describe(error));
  }
});

$("new-project").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("create-project").disabled = true;
  $("preview-hint").textContent = "Creating the project and installing its dependencies…";
  try {
    const project = await call("POST", "/api/sandbox/projects", {
      template: $("template").value,
      name: $("project-name").value,
      start: true,
    });
    $("preview-hint").textContent = `${project.path} created; its dev server logs to ${project.dev_server_log}.`;
    // The dev server takes a moment to listen: show the preview once it answers.
    setTimeout(showPreview, 1500);
  } catch (error) {
    $("preview-hint").textContent = describe(error);
  } finally {
    $("create-project").disabled = false;
  }
});

const handedOver = takeTokenFromFragment();
if (handedOver) signIn(handedOver);
else showSignedIn(storedToken()), refreshState();
setInterval(refreshState, STATE_POLL_MS);
