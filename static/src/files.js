// The file tree of /workspace: folders listed when opened, kept current by the watch (main.js feeds
// it the changes), and the file operations: new file and folder, rename, delete, upload by drag and
// drop or by picking, download of a file or of a folder as a zip.
import { call, describe, request, withQuery } from "./api.js";
import { ask } from "./dialog.js";
import { nameOf, parentOf } from "./paths.js";

export const ROOT = "/workspace";
const FILES = "/api/sandbox/files";

export class FileTree {
  // element: the tree's container; onOpen(path): a file clicked; onMoved(from, to): a rename.
  constructor(element, { onOpen, onMoved, onDeleted, notify }) {
    this.element = element;
    this.onOpen = onOpen;
    this.onMoved = onMoved;
    this.onDeleted = onDeleted;
    this.notify = notify;
    // Listed folders: path -> entries, sorted folders first. A folder is shown open when listed.
    this.listed = new Map();
    this.selected = null; // {path, kind}
    this.refreshing = new Map();
    element.addEventListener("click", (event) => this.clicked(event));
    element.addEventListener("keydown", (event) => this.keyed(event));
    this.acceptDrops(element);
  }

  async load() {
    this.listed.clear();
    await this.refresh(ROOT);
  }

  clear() {
    this.listed.clear();
    this.selected = null;
    this.render();
  }

  // Lists a folder again (one request per folder at a time, however many changes ask for it).
  refresh(folder) {
    if (this.refreshing.has(folder)) return this.refreshing.get(folder);
    const listing = this.list(folder).finally(() => this.refreshing.delete(folder));
    this.refreshing.set(folder, listing);
    return listing;
  }

  async list(folder) {
    try {
      const { entries } = await call("GET", withQuery(FILES, { path: folder }));
      entries.sort((a, b) => (a.kind === "folder") !== (b.kind === "folder") ? (a.kind === "folder" ? -1 : 1) : a.name.localeCompare(b.name));
      this.listed.set(folder, entries);
    } catch (error) {
      // A folder that went away closes, with all it held; anything else is worth saying.
      if (error.status !== 404 && error.code !== "not_a_folder") this.notify(describe(error));
      for (const path of [...this.listed.keys()]) if (path === folder || path.startsWith(`${folder}/`)) this.listed.delete(path);
    }
    this.render();
  }

  // The watch's changes: each folder shown that gained, lost or changed an entry is listed again.
  changed(changes) {
    const folders = new Set();
    for (const { event, path, from } of changes) {
      if (event === "changed") folders.add(path);
      folders.add(parentOf(path));
      if (from) folders.add(parentOf(from));
    }
    for (const folder of folders) if (this.listed.has(folder)) this.refresh(folder);
  }

  async toggle(path) {
    if (this.listed.has(path)) {
      for (const open of [...this.listed.keys()]) if (open === path || open.startsWith(`${path}/`)) this.listed.delete(open);
      this.render();
    } else {
      await this.refresh(path);
    }
  }

  // Where a new file goes: the selected folder, the selected file's folder, or the root.
  targetFolder() {
    if (!this.selected) return ROOT;
    return this.selected.kind === "folder" ? this.selected.path : parentOf(this.selected.path);
  }

  async newFile() {
    const folder = this.targetFolder();
    const name = await ask(`New file in ${folder}`, { value: "", confirm: "Create" });
    if (!name) return;
    try {
      const query = { path: `${folder}/${name}`, parents: true, overwrite: false };
      // The path as the gateway normalised it (a name may hold folders, or "..").
      const { path } = await (await request("PUT", withQuery(`${FILES}/content`, query), { body: "" })).json();
      this.selected = { path, kind: "file" };
      await this.showPath(path);
      this.onOpen(path);
    } catch (error) {
      this.notify(describe(error));
    }
  }

  async newFolder() {
    const folder = this.targetFolder();
    const name = await ask(`New folder in ${folder}`, { value: "", confirm: "Create" });
    if (!name) return;
    try {
      const made = await call("POST", `${FILES}/folders`, { path: `${folder}/${name}`, parents: true });
      this.selected = { path: made.path, kind: "folder" };
      await this.showPath(made.path);
    } catch (error) {
      this.notify(describe(error));
    }
  }

  async rename() {
    if (!this.selected) return;
    const { path } = this.selected;
    const name = await ask(`Rename ${path} to`, { value: nameOf(path), confirm: "Rename" });
    if (!name || name === nameOf(path)) return;
    const to = `${parentOf(path)}/${name}`;
    try {
      const moved = await call("POST", `${FILES}/move`, { from: path, to });
      // Selected at once: what the user does next acts on the new name, not the old one.
      this.selected = { path: moved.path, kind: moved.kind };
      this.onMoved(path, moved.path);
      await this.refresh(parentOf(path));
      await this.showPath(moved.path);
    } catch (error) {
      this.notify(describe(error));
    }
  }

  async remove() {
    if (!this.selected) return;
    const { path, kind } = this.selected;
    const what = kind === "folder" ? `the folder ${path} and everything in it` : path;
    if (!(await ask(`Delete ${what}? This cannot be undone.`, { confirm: "Delete", danger: true }))) return;
    try {
      await call("DELETE", withQuery(FILES, { path, recursive: kind === "folder" }));
      this.selected = null;
      this.onDeleted(path);
      await this.refresh(parentOf(path));
    } catch (error) {
      this.notify(describe(error));
    }
  }

  // A navigation carries no token, so the gateway gives a one-use, one-minute link first; the
  // browser then streams the file (or the folder's zip) to disk, holding none of it.
  async download() {
    const { path } = this.selected ?? { path: ROOT };
    try {
      const { url } = await call("POST", `${FILES}/download-link`, { path, format: "zip" });
      const link = document.createElement("a");
      link.href = url;
      link.download = ""; // the name the gateway gives (Content-Disposition)
      link.click();
    } catch (error) {
      this.notify(describe(error));
    }
  }

  // Files (with the folders they sit in, for a dropped folder) into `folder`, one multipart upload.
  async upload(files, folder = this.targetFolder()) {
    if (!files.length) return;
    const form = new FormData();
    for (const { file, name } of files) form.append("file", file, name);
    this.notify(`Uploading ${files.length} file${files.length === 1 ? "" : "s"} to ${folder}…`);
    try {
      await request("POST", withQuery(`${FILES}/upload`, { path: folder }), { body: form });
      this.notify("");
      await this.showPath(folder);
      await this.refresh(folder);
    } catch (error) {
      this.notify(describe(error));
    }
  }

  acceptDrops(element) {
    element.addEventListener("dragover", (event) => {
      if (!event.dataTransfer?.types.includes("Files")) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      this.markDropTarget(this.dropFolder(event));
    });
    element.addEventListener("dragleave", (event) => {
      if (!element.contains(event.relatedTarget)) this.markDropTarget(null);
    });
    element.addEventListener("drop", async (event) => {
      event.preventDefault();
      this.markDropTarget(null);
      const folder = this.dropFolder(event);
      await this.upload(await droppedFiles(event.dataTransfer), folder);
    });
  }

  // A drop on a folder goes into it, on a file beside it, elsewhere into the root.
  dropFolder(event) {
    const row = event.target.closest?.(".row");
    if (!row) return ROOT;
    return row.dataset.kind === "folder" ? row.dataset.path : parentOf(row.dataset.path);
  }

  markDropTarget(folder) {
    this.element.classList.toggle("drop", folder === ROOT);
    for (const row of this.element.querySelectorAll(".row")) row.classList.toggle("drop", row.dataset.path === folder);
  }

  // Opens the folders down to `path` (and lists its own folder again, which holds it).
  async showPath(path) {
    const folders = [];
    for (let folder = parentOf(path); folder.startsWith(ROOT) && folder.length >= ROOT.length; folder = parentOf(folder)) {
      folders.unshift(folder);
      if (folder === ROOT) break;
    }
    for (const folder of folders) await this.refresh(folder);
  }

  select(path, kind) {
    this.selected = path ? { path, kind } : null;
    this.render();
  }

  clicked(event) {
    const row = event.target.closest(".row");
    if (!row) return this.select(null);
    const { path, kind } = row.dataset;
    this.select(path, kind);
    if (kind === "folder") this.toggle(path);
    else this.onOpen(path);
  }

  keyed(event) {
    if (event.key === "Delete" && this.selected) this.remove();
    else if (event.key === "F2" && this.selected) this.rename();
    else if (event.key === "Enter" && event.target.closest(".row")) event.target.closest(".row").click();
  }

  render() {
    const list = this.renderFolder(ROOT, 0);
    this.element.replaceChildren(...(list ? [list] : []));
    document.getElementById("files-empty").hidden = this.listed.get(ROOT)?.length !== 0;
  }

  renderFolder(folder, depth) {
    const entries = this.listed.get(folder);
    if (!entries) return null;
    const list = document.createElement("ul");
    list.setAttribute("role", depth === 0 ? "tree" : "group");
    for (const entry of entries) {
      const item = document.createElement("li");
      const row = document.createElement("div");
      const open = this.listed.has(entry.path);
      row.className = `row ${entry.kind}`;
      row.dataset.path = entry.path;
      row.dataset.kind = entry.kind === "folder" ? "folder" : "file";
      row.tabIndex = 0;
      row.setAttribute("role", "treeitem");
      row.style.paddingLeft = `${0.5 + depth * 0.9}rem`;
      row.title = entry.kind === "file" ? `${entry.path}, ${entry.size} bytes` : entry.path;
      if (entry.kind === "folder") row.setAttribute("aria-expanded", String(open));
      if (this.selected?.path === entry.path) row.setAttribute("aria-selected", "true");
      const icon = document.createElement("span");
      icon.className = "icon";
      icon.textContent = entry.kind === "folder" ? (open ? "▾" : "▸") : entry.kind === "symlink" ? "↪" : "";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = entry.name;
      row.append(icon, name);
      item.append(row);
      const children = open && this.renderFolder(entry.path, depth + 1);
      if (children) item.append(children);
      list.append(item);
    }
    return list;
  }
}

// The files of a drop, with their paths inside any dropped folder (read through the entries API).
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...transfer.files].map((file) => ({ file, name: file.name }));
  const files = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      files.push({ file, name: prefix + entry.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch; (batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject))).length; ) {
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const entry of entries) await walk(entry, "");
  return files;
}
