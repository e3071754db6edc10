// Wires the page: sign-in and the sandbox's state, the file tree and its watch, the editor's tabs
// and Run, the terminal tabs and the preview. Each of those is a module of its own; this one only
// says what follows what.
import "./style.css";
import { ApiError, call, describe, storeToken, storedToken, takeTokenFromFragment, userOf } from "./api.js";
import { CodeEditor } from "./editor.js";
import { FileTree, ROOT } from "./files.js";
import { parentOf } from "./paths.js";
import { showShares, wirePreview } from "./preview.js";
import { Runner, runtimeOf } from "./run.js";
import { Tabs } from "./tabs.js";
import { TerminalTabs } from "./terminals.js";
import { FileWatch } from "./watch.js";

const $ = (id) => document.getElementById(id);
const STATE_POLL_MS = 10_000;
const SIGNED_IN_CONTROLS = ["run", "save", "connect", "new-terminal", "preview-reload", "preview-port", "create-project", "share"];
const FILE_CONTROLS = ["new-file", "new-folder", "upload", "rename", "delete", "download"];

function notify(message) {
  $("notice").textContent = message ?? "";
}

const editor = new CodeEditor($("editor"), {
  onSave: () => tabs.save(),
  onRun: () => runActive(),
  onChange: () => tabs.edited(),
});
const tabs = new Tabs({ bar: $("tabs"), notice: $("file-notice"), language: $("language") }, editor, notify);
const tree = new FileTree($("files"), {
  onOpen: (path) => tabs.open(path),
  onMoved: (from, to) => tabs.moved(from, to),
  onDeleted: (path) => tabs.changedOnDisk({ event: "deleted", path }),
  notify,
});
const watch = new FileWatch(ROOT, {
  // A (re)connected watch missed what changed meanwhile: list the folders shown again.
  onReady: () => tree.load().then(() => tabs.tabs.forEach((tab) => tab.path && tabs.recheck(tab))),
  onChanges: (changes) => {
    tree.changed(changes);
    for (const change of changes) tabs.changedOnDisk(change);
  },
});
const terminals = new TerminalTabs({ bar: $("terminal-tabs"), panes: $("terminal"), status: $("terminal-status") });
const runner = new Runner({ stdout: $("stdout"), stderr: $("stderr"), status: $("run-status") }, (running) => {
  $("run").textContent = running ? "Stop" : "Run";
});
let sandbox = null;

function showSignedIn(token) {
  const user = token ? userOf(token) : null;
  $("sign-in").hidden = Boolean(user);
  $("account").hidden = !user;
  $("user").textContent = user ?? "";
  for (const id of SIGNED_IN_CONTROLS) $(id).disabled = !user;
}

const STOPPED_MESSAGES = {
  signedOut: "Sign in with your token above.",
  none: "You have no sandbox yet. Start makes one: a container of your own, whose /workspace is kept between starts.",
  stopped: "Your sandbox is stopped. Start brings it back with its files.",
  starting: "Starting your sandbox…",
};

// Everything that shows the sandbox follows its state: the tree and its watch, the terminals.
function showSandbox(next, { signedIn = true } = {}) {
  const wasRunning = sandbox?.state === "running";
  sandbox = next;
  const state = next?.state ?? "none";
  const running = state === "running";
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("start").disabled = running;
  $("stop").disabled = !running;
  if (next?.preview_url) $("preview-link").href = next.preview_url;
  $("preview-hint").dataset.state = state;
  if (state === "stopped") $("preview-hint").textContent = "Your sandbox is stopped: Start brings it back with its files.";
  $("stopped").hidden = running;
  const unsaved = tabs.dirtyTabs().filter((tab) => tab.path).length;
  $("stopped-message").textContent =
    (STOPPED_MESSAGES[signedIn ? state : "signedOut"] ?? `Your sandbox is ${state}.`) +
    (unsaved && signedIn ? ` Your ${unsaved} unsaved tab${unsaved === 1 ? " is" : "s are"} kept here: save once it runs.` : "");
  $("start-again").hidden = !signedIn || running;
  for (const id of FILE_CONTROLS) $(id).disabled = !running;
  if (running && !watch.open) watch.start();
  if (running && !terminals.connected) terminals.restore();
  if (running && !wasRunning) tabs.reopen();
  if (!running) {
    watch.stop();
    tree.clear();
  }
}

async function refreshState() {
  if (!storedToken()) return;
  try {
    showSandbox(await call("GET", "/api/sandbox"));
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
  terminals.disconnect({ forget: true });
  watch.stop();
  storeToken(null);
  showSignedIn(null);
  showSandbox(null, { signedIn: false });
  notify(message);
}

async function start() {
  $("start").disabled = $("start-again").disabled = true;
  $("state").textContent = "starting";
  $("stopped-message").textContent = STOPPED_MESSAGES.starting;
  try {
    showSandbox(await call("POST", "/api/sandbox"));
    notify("");
  } catch (error) {
    notify(describe(error));
    await refreshState();
  } finally {
    $("start-again").disabled = false;
  }
}

// Run: the scratch buffer with its language, or the active file (saved first) by its extension,
// in its own folder. While it runs, the button stops it.
async function runActive() {
  if (runner.running) return runner.stop();
  const tab = tabs.active;
  if (!tab.path) return runner.run({ language: tab.runtime, code: tabs.text(tab) });
  const runtime = runtimeOf(tab.path);
  if (!runtime) return runner.status(`Run knows .js (node), .py (python3) and .sh (bash) files; ${tab.name} is none`, false);
  if (editor.isDirty(tab.document) && !(await tabs.save(tab))) return;
  await runner.run({ argv: [runtime, tab.path], cwd: parentOf(tab.path) });
}

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!userOf(token)) return notify("That does not look like a JWT.");
  $("token").value = "";
  signIn(token);
});
$("sign-out").addEventListener("click", () => signOut(""));
$("start").addEventListener("click", start);
$("start-again").addEventListener("click", start);
$("stop").addEventListener("click", async () => {
  $("stop").disabled = true;
  try {
    await call("DELETE", "/api/sandbox");
  } catch (error) {
    notify(describe(error));
  }
  await refreshState();
});

$("language").addEventListener("change", () => tabs.setRuntime($("language").value));
$("save").addEventListener("click", () => tabs.save());
$("run").addEventListener("click", runActive);

$("new-file").addEventListener("click", () => tree.newFile());
$("new-folder").addEventListener("click", () => tree.newFolder());
$("rename").addEventListener("click", () => tree.rename());
$("delete").addEventListener("click", () => tree.remove());
$("download").addEventListener("click", () => tree.download());
$("upload").addEventListener("change", async () => {
  await tree.upload([...$("upload").files].map((file) => ({ file, name: file.name })));
  $("upload").value = "";
});

$("new-terminal").addEventListener("click", () => terminals.open());
$("connect").addEventListener("click", () => terminals.reconnect());
wirePreview(notify);

// Ctrl/Cmd-S outside the editor too (the tree, the output) saves, rather than saving the page.
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "s" && !event.defaultPrevented) {
    event.preventDefault();
    tabs.save();
  }
});
window.addEventListener("beforeunload", (event) => {
  if (tabs.dirtyTabs().some((tab) => tab.path)) event.preventDefault();
});

const handedOver = takeTokenFromFragment();
if (handedOver) signIn(handedOver);
else if (storedToken()) showSignedIn(storedToken()), refreshState();
else showSignedIn(null), showSandbox(null, { signedIn: false });
setInterval(refreshState, STATE_POLL_MS);
