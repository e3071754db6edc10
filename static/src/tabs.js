// The open files, as tabs over the editor: open, save (with If-Match, so a save never overwrites a
// change made on disk since the file was read), close, and what becomes of a tab whose file changes
// on disk: reloaded when it has no unsaved edits, else a notice that lets the user choose.
import { ApiError, describe, request, withQuery } from "./api.js";
import { ask } from "./dialog.js";
import { RUNTIME_LANGUAGE, languageOfName } from "./editor.js";
import { nameOf } from "./paths.js";
import { tabElement } from "./tabbar.js";

const CONTENT = "/api/sandbox/files/content";
const STAT = "/api/sandbox/files/stat";
// Larger files are downloaded, not edited: CodeMirror copes, a browser tab's memory less so.
const MAX_EDITABLE_BYTES = 4 * 1024 * 1024;
// The paths of the open tabs, reopened after a reload (per browser tab, as the token).
const OPEN_KEY = "sandbox-gateway.open-files";

const SAMPLES = {
  node: 'console.log("hello from", process.version);\n',
  python: 'import sys\nprint("hello from", sys.version.split()[0])\n',
  bash: 'echo "hello from $(bash --version | head -n1)"\n',
};

const EXTENSION_OF_RUNTIME = { node: ".js", python: ".py", bash: ".sh" };

const isUnder = (path, folder) => path === folder || path.startsWith(folder.endsWith("/") ? folder : `${folder}/`);

async function readText(path) {
  const response = await request("GET", withQuery(CONTENT, { path }));
  const size = Number(response.headers.get("Content-Length") ?? 0);
  if (size > MAX_EDITABLE_BYTES) {
    response.body?.cancel();
    throw new Error(`${nameOf(path)} is ${size} bytes, too large to edit here: download it instead`);
  }
  const bytes = await response.arrayBuffer();
  let text;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new Error(`${nameOf(path)} is not UTF-8 text: download it instead`);
  }
  return { text, etag: response.headers.get("ETag") };
}

export class Tabs {
  // elements: {bar, notice, language}; notify(message) reports errors to the page.
  constructor(elements, editor, notify) {
    this.elements = elements;
    this.editor = editor;
    this.notify = notify;
    this.tabs = [];
    this.active = null;
    const runtime = elements.language.value;
    this.scratch = this.add({
      path: null,
      name: "scratch",
      runtime,
      document: editor.createDocument(SAMPLES[runtime], RUNTIME_LANGUAGE[runtime]),
    });
    this.activate(this.scratch);
  }

  add(fields) {
    const tab = { etag: null, disk: null, saving: null, ...fields };
    this.tabs.push(tab);
    this.render();
    return tab;
  }

  find(path) {
    return this.tabs.find((tab) => tab.path === path) ?? null;
  }

  // quietly: a file that is gone is no error (a tab remembered from before a reload).
  async open(path, { quietly = false } = {}) {
    const open = this.find(path);
    if (open) return this.activate(open);
    try {
      const { text, etag } = await readText(path);
      const tab = this.find(path) ?? this.add({ path, name: nameOf(path), etag, document: this.editor.createDocument(text, languageOfName(path)) });
      this.activate(tab);
      this.remember();
    } catch (error) {
      if (!(quietly && error instanceof ApiError && error.status === 404)) this.notify(describe(error));
    }
  }

  activate(tab) {
    this.active = tab;
    this.editor.show(tab.document);
    this.render();
    this.editor.focus();
  }

  async close(tab) {
    if (tab === this.scratch) return;
    if (this.editor.isDirty(tab.document)) {
      const discard = await ask(`${tab.name} has unsaved changes. Close it and lose them?`, { confirm: "Discard", danger: true });
      if (!discard) return;
    }
    const index = this.tabs.indexOf(tab);
    this.tabs.splice(index, 1);
    if (this.active === tab) this.activate(this.tabs[Math.min(index, this.tabs.length - 1)]);
    this.render();
    this.remember();
  }

  // Saves the active file; `overwrite` drops the If-Match (the user chose their version). The
  // scratch buffer is saved as a new file, opened in a tab of its own.
  async save(tab = this.active, { overwrite = false } = {}) {
    if (!tab) return false;
    if (!tab.path) return this.saveAs(tab);
    // One save of a tab at a time: a second must send the etag the first one brings back.
    while (tab.saving) await tab.saving;
    const snapshot = this.editor.snapshot(tab.document);
    const headers = { "Content-Type": "application/octet-stream" };
    if (tab.etag && !overwrite && tab.disk !== "deleted") headers["If-Match"] = tab.etag;
    const writing = request("PUT", withQuery(CONTENT, { path: tab.path, parents: true }), {
      body: snapshot.toString(),
      headers,
    });
    tab.saving = writing.catch(() => null);
    try {
      const response = await writing;
      tab.etag = response.headers.get("ETag");
      tab.disk = null;
      this.editor.markSaved(tab.document, snapshot);
      return true;
    } catch (error) {
      if (error instanceof ApiError && error.code === "precondition_failed") tab.disk = "changed";
      else this.notify(describe(error));
      return false;
    } finally {
      tab.saving = null;
      this.render();
    }
  }

  async saveAs(tab) {
    const name = await ask("Save the scratch buffer as a file (in /workspace unless the path says otherwise)", {
      value: `scratch${EXTENSION_OF_RUNTIME[tab.runtime]}`,
      confirm: "Save",
    });
    if (!name) return false;
    try {
      const response = await request("PUT", withQuery(CONTENT, { path: name, parents: true, overwrite: false }), {
        body: this.text(tab),
        headers: { "Content-Type": "application/octet-stream" },
      });
      await this.open((await response.json()).path);
      return true;
    } catch (error) {
      this.notify(describe(error));
      return false;
    }
  }

  async reload(tab) {
    try {
      const { text, etag } = await readText(tab.path);
      this.editor.replaceText(tab.document, text);
      tab.etag = etag;
      tab.disk = null;
    } catch (error) {
      this.notify(describe(error));
    }
    this.render();
  }

  // What the watch reports (watch.js): a change of `path`, or of anything under it for a
  // coalesced "changed" of a folder.
  async changedOnDisk(change) {
    // A move's tabs follow it; a file that another took the place of (`sed -i`, an editor's save
    // through a temporary file) is rechecked as any change is.
    if (change.event === "moved") this.moved(change.from, change.path);
    const affected = this.tabs.filter((tab) => tab.path && isUnder(tab.path, change.path));
    await Promise.all(affected.map((tab) => this.recheck(tab)));
  }

  // The file as it is now against the tab: the same etag is our own save coming back.
  async recheck(tab) {
    await tab.saving;
    let etag = null;
    try {
      etag = (await (await request("GET", withQuery(STAT, { path: tab.path }))).json()).etag;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) return;
    }
    if (etag === tab.etag && etag !== null) return;
    if (etag === null) tab.disk = "deleted";
    else if (!this.editor.isDirty(tab.document)) return this.reload(tab);
    else tab.disk = "changed";
    this.render();
  }

  // A rename in the tree, or a move seen by the watch: the tabs follow their files.
  moved(from, to) {
    for (const tab of this.tabs) {
      if (!tab.path || !isUnder(tab.path, from)) continue;
      tab.path = to + tab.path.slice(from.length);
      tab.name = nameOf(tab.path);
      tab.disk = null;
    }
    this.render();
    this.remember();
  }

  // After an edit of the active tab: its dirty marker, redrawn only when it comes or goes.
  edited() {
    const tab = this.active;
    const dirty = this.editor.isDirty(tab.document);
    if (dirty !== Boolean(tab.dirty)) {
      tab.dirty = dirty;
      this.render();
    }
  }

  dirtyTabs() {
    return this.tabs.filter((tab) => this.editor.isDirty(tab.document));
  }

  remember() {
    sessionStorage.setItem(OPEN_KEY, JSON.stringify(this.tabs.filter((tab) => tab.path).map((tab) => tab.path)));
  }

  async reopen() {
    const paths = JSON.parse(sessionStorage.getItem(OPEN_KEY) ?? "[]");
    for (const path of paths) if (!this.find(path)) await this.open(path, { quietly: true });
    this.remember();
  }

  setRuntime(runtime) {
    const scratch = this.scratch;
    const isSample = Object.values(SAMPLES).includes(this.editor.snapshot(scratch.document).toString());
    scratch.runtime = runtime;
    this.editor.setLanguage(scratch.document, RUNTIME_LANGUAGE[runtime]);
    if (isSample) this.editor.replaceText(scratch.document, SAMPLES[runtime]);
  }

  text(tab) {
    return this.editor.snapshot(tab.document).toString();
  }

  render() {
    const { bar, notice, language } = this.elements;
    bar.replaceChildren(...this.tabs.map((tab) => this.renderTab(tab)));
    language.hidden = this.active !== this.scratch;
    this.renderNotice(notice, this.active);
  }

  renderTab(tab) {
    tab.dirty = this.editor.isDirty(tab.document);
    let marker = null;
    if (tab.dirty && tab.path) {
      marker = document.createElement("span");
      marker.className = "dirty";
      marker.title = "unsaved changes";
      marker.textContent = "●";
    }
    const closable = tab !== this.scratch;
    const item = tabElement({
      name: tab.name,
      selected: tab === this.active,
      title: tab.path ?? "A scratch buffer: Run runs it with the language picked beside it",
      marker,
      onActivate: () => this.activate(tab),
      onClose: closable ? () => this.close(tab) : null,
    });
    if (tab.path) item.dataset.path = tab.path;
    if (tab.disk) item.classList.add("conflict");
    if (closable) item.addEventListener("auxclick", (event) => event.button === 1 && this.close(tab));
    return item;
  }

  renderNotice(notice, tab) {
    notice.hidden = !tab?.disk;
    if (!tab?.disk) return;
    const text =
      tab.disk === "deleted"
        ? `${tab.name} was deleted on disk. Save writes it again.`
        : `${tab.name} changed on disk since you opened it, and you have unsaved changes.`;
    const actions = [];
    if (tab.disk === "changed") {
      actions.push(this.button("Reload from disk", "reload-from-disk", () => this.reload(tab)));
      actions.push(this.button("Overwrite with mine", "overwrite", () => this.save(tab, { overwrite: true })));
    }
    const message = document.createElement("span");
    message.textContent = text;
    notice.replaceChildren(message, ...actions);
  }

  button(label, id, action) {
    const button = document.createElement("button");
    button.textContent = label;
    button.id = id;
    button.addEventListener("click", action);
    return button;
  }
}
