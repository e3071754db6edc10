// The preview pane: the sandbox's dev server in an iframe at its own origin, the port picker, share
// links and new projects from templates.
import { call, describe } from "./api.js";

const $ = (id) => document.getElementById(id);

// Browsers send no Authorization header from an iframe: a one-minute login link on the sandbox's own
// preview origin trades for an HttpOnly cookie of that origin, then redirects to the preview itself.
// Another port of the sandbox has an origin (and a cookie) of its own: its login link comes with {port}.
let previewPort = null; // null: 5173, at the sandbox's own origin
let notify = () => {};

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

export async function showShares() {
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

// notifyWith(message): where errors are reported.
export function wirePreview(notifyWith) {
  notify = notifyWith;
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
}
