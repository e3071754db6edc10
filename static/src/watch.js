// The watch of /workspace (README, "Files"): one WebSocket whose coalesced batches of changes go to
// onChanges. It reconnects while the sandbox runs; each "ready" after a reconnect is reported too,
// since changes made meanwhile were not seen (the tree lists its folders again).
import { openSocket, withQuery } from "./api.js";

const PROTOCOL = "sandbox-files.v1";
// Close codes after which a watch may work again: the gateway going (1001), the agent lost for a
// moment (1011), a dropped network (1006), too many watches just now (4029).
const RETRY_CODES = new Set([1001, 1006, 1011, 4029]);
const RETRY_DELAYS_MS = [500, 1000, 2000, 5000, 10000];

export class FileWatch {
  constructor(path, { onChanges, onReady }) {
    this.path = path;
    this.onChanges = onChanges;
    this.onReady = onReady;
    this.socket = null;
    this.tries = 0;
    this.retry = null;
  }

  get open() {
    return this.socket !== null;
  }

  start() {
    this.stop();
    const socket = openSocket(withQuery("/api/sandbox/files/watch", { path: this.path }), PROTOCOL);
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        this.tries = 0;
        this.onReady();
      } else if (message.type === "changes") {
        this.onChanges(message.changes);
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (!RETRY_CODES.has(event.code)) return;
      const delay = RETRY_DELAYS_MS[Math.min(this.tries++, RETRY_DELAYS_MS.length - 1)];
      this.retry = setTimeout(() => this.start(), delay);
    };
    this.socket = socket;
  }

  stop() {
    clearTimeout(this.retry);
    const socket = this.socket;
    this.socket = null;
    socket?.close(1000, "closed by the page");
  }
}
