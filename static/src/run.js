// Run: a program as a process of the sandbox (README, "Processes"), its output streamed into the
// output pane as it comes. EventSource cannot send an Authorization header, so the stream is read
// with fetch, and parsed here as the server-sent events it is.
import { ApiError, call, describe, request } from "./api.js";
import { extensionOf } from "./paths.js";

const RECONNECT_DELAY_MS = 1000;
const RECONNECT_TRIES = 5;

// The runtime of a file, by its extension: the same three as the execute API.
const RUNTIME_OF_EXTENSION = { js: "node", mjs: "node", cjs: "node", py: "python3", sh: "bash", bash: "bash" };

export function runtimeOf(path) {
  return RUNTIME_OF_EXTENSION[extensionOf(path)] ?? null;
}

// One event of a text/event-stream: {event, id, data}. `blocks` yields the text between blank lines.
function parseEvent(block) {
  const parsed = { event: "message", id: null, data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") parsed.event = value;
    else if (field === "id") parsed.id = value;
    else if (field === "data") parsed.data.push(value);
  }
  return parsed.data.length ? { ...parsed, data: JSON.parse(parsed.data.join("\n")) } : null;
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event) yield event;
    }
  }
}

export class Runner {
  // panes: {stdout, stderr, status} elements; onState(running) when a run starts or ends.
  constructor(panes, onState) {
    this.panes = panes;
    this.onState = onState;
    this.process = null;
    this.aborter = null;
  }

  get running() {
    return this.process !== null;
  }

  // body: the processes API's start, {argv, cwd} or {language, code}.
  async run(body) {
    this.clear();
    this.status("running…", null);
    this.onState(true);
    const started = performance.now();
    try {
      this.process = await call("POST", "/api/sandbox/processes", { ...body, stdin: "" });
      this.aborter = new AbortController();
      const ending = await this.follow(this.process.id, this.aborter.signal);
      const record = await call("GET", `/api/sandbox/processes/${encodeURIComponent(this.process.id)}`).catch(
        () => null,
      );
      const ms = record?.ended_at ? Math.round((record.ended_at - record.started_at) * 1000) : Math.round(performance.now() - started);
      this.status(this.describeEnding(ending, ms), ending.exit_code === 0 && !ending.timed_out);
    } catch (error) {
      if (error.name !== "AbortError") this.status(describe(error), false);
    } finally {
      this.process = null;
      this.aborter = null;
      this.onState(false);
    }
  }

  // Reads the output from its start until the exit event; a cut stream resumes where it stopped.
  async follow(id, signal) {
    let offset = 0;
    for (let tries = 0; ; ) {
      let response;
      try {
        response = await request("GET", `/api/sandbox/processes/${encodeURIComponent(id)}/output?from=${offset}`, {
          signal,
          headers: { Accept: "text/event-stream" },
        });
        if (response.status === 204) return { exit_code: null, signal: null, timed_out: false };
        for await (const { event, id: next, data } of serverSentEvents(response)) {
          if (next !== null) offset = Number(next);
          tries = 0;
          if (event === "stdout" || event === "stderr") this.panes[event].append(data.text);
          else if (event === "gap") this.panes.stderr.append(`\n[${data.dropped} bytes of output dropped]\n`);
          else if (event === "exit") return data;
        }
      } catch (error) {
        if (signal.aborted || error instanceof ApiError) throw error;
      }
      if (++tries > RECONNECT_TRIES) throw new Error("the output stream was lost");
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAY_MS));
    }
  }

  describeEnding({ exit_code, signal, timed_out }, ms) {
    const how = exit_code === null ? `killed by ${signal ?? "a signal"}` : `exit code ${exit_code}`;
    return `${how} in ${ms} ms${timed_out ? " (timed out)" : ""}`;
  }

  // Stop: SIGKILL, as DELETE does; the stream then ends with the exit event.
  async stop() {
    if (!this.process) return;
    await call("DELETE", `/api/sandbox/processes/${encodeURIComponent(this.process.id)}`).catch(() => {});
  }

  clear() {
    this.panes.stdout.textContent = "";
    this.panes.stderr.textContent = "";
  }

  status(text, ok) {
    this.panes.status.textContent = text;
    if (ok === null) delete this.panes.status.dataset.ok;
    else this.panes.status.dataset.ok = String(ok);
  }
}
