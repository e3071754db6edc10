// Terminal tabs: several terminals of the sandbox, each its own shell, all of which come back after
// a reload. Their ids are kept per browser tab (sessionStorage, as the token): the gateway keeps a
// detached terminal for TERMINAL_GRACE_S, and each reattaches with its replay (README, "The web terminal").
import { call } from "./api.js";
import { tabElement } from "./tabbar.js";
import { SandboxTerminal } from "./terminal.js";

const STORED_KEY = "sandbox-gateway.terminals";

export class TerminalTabs {
  // elements: {bar, panes, status}: the tab bar (its last child is the "+" button), where the
  // terminals go, and the active one's status.
  constructor(elements) {
    this.elements = elements;
    this.tabs = [];
    this.active = null;
    this.counter = 0;
  }

  get connected() {
    return this.tabs.some((tab) => tab.terminal.socket);
  }

  // After a start or a reload: the terminals this browser tab had, else a new one.
  restore() {
    if (this.tabs.length) return this.tabs.forEach((tab) => tab.terminal.socket || tab.terminal.connect());
    const stored = JSON.parse(sessionStorage.getItem(STORED_KEY) ?? "null");
    const ids = stored?.ids?.length ? stored.ids : [null];
    for (const id of ids) this.add(id);
    this.activate(this.tabs[Math.min(stored?.active ?? 0, this.tabs.length - 1)]);
  }

  add(id = null) {
    const pane = document.createElement("div");
    pane.className = "terminal-pane";
    this.elements.panes.append(pane);
    const tab = { pane, name: `bash ${++this.counter}` };
    tab.terminal = new SandboxTerminal(pane, {
      id,
      onStatus: (status) => {
        if (tab === this.active) this.elements.status.textContent = status;
      },
      onId: () => this.remember(),
    });
    this.tabs.push(tab);
    tab.terminal.connect();
    this.render();
    return tab;
  }

  open() {
    this.activate(this.add());
  }

  activate(tab) {
    this.active = tab;
    for (const each of this.tabs) each.pane.toggleAttribute("data-active", each === tab);
    this.elements.status.textContent = tab?.terminal.status ?? "";
    tab?.terminal.fit.fit();
    tab?.terminal.term.focus();
    this.render();
    this.remember();
  }

  // Closing a tab ends its shell (DELETE), as closing a terminal window does.
  async close(tab) {
    const { id } = tab.terminal;
    tab.terminal.dispose();
    tab.pane.remove();
    const index = this.tabs.indexOf(tab);
    this.tabs.splice(index, 1);
    if (id) await call("DELETE", `/api/sandbox/terminals/${encodeURIComponent(id)}`).catch(() => {});
    if (this.active === tab) this.activate(this.tabs[Math.min(index, this.tabs.length - 1)] ?? null);
    this.render();
    this.remember();
  }

  reconnect() {
    this.active?.terminal.connect();
  }

  // Signing out: the sockets close, the shells stay detached for their grace period.
  disconnect({ forget = false } = {}) {
    for (const tab of this.tabs) {
      tab.terminal.dispose();
      tab.pane.remove();
    }
    this.tabs = [];
    this.active = null;
    this.elements.status.textContent = "";
    if (forget) sessionStorage.removeItem(STORED_KEY);
    this.render();
  }

  remember() {
    const ids = this.tabs.map((tab) => tab.terminal.id).filter(Boolean);
    sessionStorage.setItem(STORED_KEY, JSON.stringify({ ids, active: Math.max(0, this.tabs.indexOf(this.active)) }));
  }

  render() {
    const { bar } = this.elements;
    const add = bar.lastElementChild;
    const items = this.tabs.map((tab) =>
      tabElement({
        name: tab.name,
        selected: tab === this.active,
        onActivate: () => this.activate(tab),
        onClose: () => this.close(tab),
        closeTitle: `Close ${tab.name} (ends its shell)`,
      }),
    );
    bar.replaceChildren(...items, add);
  }
}
