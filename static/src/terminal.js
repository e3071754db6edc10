// The terminal: xterm.js bridged to the gateway's TTY WebSocket (see README, "Terminal protocol").
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";

// v2: the gateway names the terminal, which outlives the socket (README, "The web terminal").
const PROTOCOL = "sandbox-terminal.v2";
// The terminal this tab reattaches to after a reload: per tab, as the shell it shows.
const STORED_ID = "sandbox-terminal-id";
// Close codes after which the same terminal may still be there: a dropped network (1006), a gateway
// restarting (1001), the agent unreachable for a moment (1011), a socket that fell behind (4008).
const REATTACH_CODES = new Set([1001, 1006, 1011, 4008]);
const REATTACH_DELAY_MS = 1000;
const REATTACH_TRIES = 10;

export class SandboxTerminal {
  constructor(element, onStatus) {
    this.term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(element);
    this.fit.fit();
    this.onStatus = onStatus;
    this.socket = null;
    this.token = null;
    this.tries = 0;
    this.encoder = new TextEncoder();

    this.term.onData((data) => this.send(this.encoder.encode(data)));
    // Raw bytes that are not text (some mouse reports) arrive as a binary string.
    this.term.onBinary((data) => this.send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
    this.term.onResize(({ cols, rows }) => {
      if (this.isOpen()) this.socket.send(JSON.stringify({ type: "resize", cols, rows }));
    });
    new ResizeObserver(() => this.fit.fit()).observe(element);
  }

  isOpen() {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  send(bytes) {
    if (this.isOpen()) this.socket.send(bytes);
  }

  // Whether this tab left a terminal it can go back to (after a reload).
  get storedId() {
    return sessionStorage.getItem(STORED_ID);
  }

  connect(token) {
    this.disconnect();
    this.token = token;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const { cols, rows } = this.term;
    const id = this.storedId;
    const attach = id ? `&id=${encodeURIComponent(id)}` : "";
    const url = `${scheme}://${location.host}/api/sandbox/terminal?cols=${cols}&rows=${rows}${attach}`;
    // Browsers cannot set headers on a WebSocket: the token travels as a second subprotocol.
    const socket = new WebSocket(url, [PROTOCOL, `bearer.${token}`]);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.onStatus("connected");
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
        sessionStorage.removeItem(STORED_ID);
        return this.connect(this.token);
      }
      if (REATTACH_CODES.has(event.code) && this.storedId && this.tries < REATTACH_TRIES) {
        this.tries += 1;
        this.onStatus("reconnecting");
        this.socket = null;
        this.retry = setTimeout(() => this.connect(this.token), REATTACH_DELAY_MS);
        return;
      }
      sessionStorage.removeItem(STORED_ID);
      const reason = event.reason ? `: ${event.reason}` : "";
      this.term.write(`\r\n\x1b[2m[closed ${event.code}${reason}]\x1b[0m\r\n`);
      this.onStatus(`closed (${event.code}${reason})`);
      this.socket = null;
    };
    this.socket = socket;
    this.onStatus("connecting");
  }

  // The gateway's text frames: which terminal this is, and the replay that follows, first.
  control(message) {
    if (message.type !== "attached") return;
    sessionStorage.setItem(STORED_ID, message.id);
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
}
