// The terminal: xterm.js bridged to the gateway's TTY WebSocket (see README, "Terminal protocol").
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";

const PROTOCOL = "sandbox-terminal.v1";

export class SandboxTerminal {
  constructor(element, onStatus) {
    this.term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(element);
    this.fit.fit();
    this.onStatus = onStatus;
    this.socket = null;
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

  connect(token) {
    this.disconnect();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const { cols, rows } = this.term;
    const url = `${scheme}://${location.host}/api/sandbox/terminal?cols=${cols}&rows=${rows}`;
    // Browsers cannot set headers on a WebSocket: the token travels as a second subprotocol.
    const socket = new WebSocket(url, [PROTOCOL, `bearer.${token}`]);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.onStatus("connected");
      this.term.focus();
    };
    socket.onmessage = (event) => this.term.write(new Uint8Array(event.data));
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      const reason = event.reason ? `: ${event.reason}` : "";
      this.term.write(`\r\n\x1b[2m[closed ${event.code}${reason}]\x1b[0m\r\n`);
      this.onStatus(`closed (${event.code}${reason})`);
      this.socket = null;
    };
    this.socket = socket;
    this.onStatus("connecting");
  }

  disconnect() {
    const socket = this.socket;
    this.socket = null;
    socket?.close(1000, "closed by the page");
  }
}
