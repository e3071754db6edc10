// The terminal: xterm.js bridged to the gateway's TTY WebSocket (see README, "Terminal protocol").
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";

import { openSocket, withQuery } from "./api.js";

// v2: the gateway names the terminal, which outlives the socket (README, "The web terminal").
const PROTOCOL = "sandbox-terminal.v2";
// Close codes after which the same terminal may still be there: a dropped network (1006), a gateway
// restarting (1001), the agent unreachable for a moment (1011), a socket that fell behind (4008).
const REATTACH_CODES = new Set([1001, 1006, 1011, 4008]);
const REATTACH_DELAY_MS = 1000;
const REATTACH_TRIES = 10;

// One terminal of the sandbox in an xterm.js; `id` is the one it reattaches to (after a reload), and
// onId(id) learns the id the gateway gives it (null when it is gone), for terminals.js to keep.
export class SandboxTerminal {
  constructor(element, { id = null, onStatus, onId }) {
    this.term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(element);
    this.fit.fit();
    this.onStatus = onStatus;
    this.onId = onId;
    this.id = id;
    this.status = "";
    this.socket = null;
    this.tries = 0;
    this.encoder = new TextEncoder();

    this.term.onData((data) => this.send(this.encoder.encode(data)));
    // Raw bytes that are not text (some mouse reports) arrive as a binary string.
    this.term.onBinary((data) => this.send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
    this.term.onResize(({ cols, rows }) => {
      if (this.isOpen()) this.socket.send(JSON.stringify({ type: "resize", cols, rows }));
    });
    // A hidden tab's terminal has no size: it fits when it is shown again.
    this.resizes = new ResizeObserver(() => element.offsetParent && this.fit.fit());
    this.resizes.observe(element);
  }

  isOpen() {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  send(bytes) {
    if (this.isOpen()) this.socket.send(bytes);
  }

  setStatus(status) {
    this.status = status;
    this.onStatus(status);
  }

  forget() {
    this.id = null;
    this.onId(null);
  }

  connect() {
    this.disconnect();
    const { cols, rows } = this.term;
    const socket = openSocket(withQuery("/api/sandbox/terminal", { cols, rows, id: this.id }), PROTOCOL);
    socket.onopen = () => {
      this.setStatus("connected");
      this.term.focus();
    };
    socket.onmessage = (event) => {
      if (typeof event.data === "string") return this.control(JSON.parse(event.data));
      this.term.write(new Uint8Array(event.data));
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      if (event.code === 4004) {
        // That terminal ended while nobody watched: a new one.
        this.forget();
        return this.connect();
      }
      if (REATTACH_CODES.has(event.code) && this.id && this.tries < REATTACH_TRIES) {
        this.tries += 1;
        this.setStatus("reconnecting");
        this.socket = null;
        this.retry = setTimeout(() => this.connect(), REATTACH_DELAY_MS);
        return;
      }
      this.forget();
      const reason = event.reason ? `: ${event.reason}` : "";
      this.term.write(`\r\n\x1b[2m[closed ${event.code}${reason}]\x1b[0m\r\n`);
      this.setStatus(`closed (${event.code}${reason})`);
      this.socket = null;
    };
    this.socket = socket;
    this.setStatus("connecting");
  }

  // The gateway's text frames: which terminal this is, and the replay that follows, first.
  control(message) {
    if (message.type !== "attached") return;
    this.id = message.id;
    this.onId(message.id);
    this.tries = 0;
    // The replay redraws the screen from a clean one, as it was when the terminal was left.
    if (!message.new) this.term.reset();
  }

  disconnect() {
    clearTimeout(this.retry);
    const socket = this.socket;
    this.socket = null;
    socket?.close(1000, "closed by the page");
  }

  dispose() {
    this.disconnect();
    this.resizes.disconnect();
    this.term.dispose();
  }
}
