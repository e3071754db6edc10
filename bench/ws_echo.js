// WebSocket echo load for bench/proxy.py: round trips one at a time (p50), then messages/s with a
// window in flight. Node and the `ws` package: a Python client tops out below what the proxies do.
// Usage: node ws_echo.js URL HEADERS_JSON ROUND_TRIPS MESSAGES WINDOW
const WebSocket = require("ws");

const [url, headersJson, roundTrips, messages, window] = process.argv.slice(2);
const socket = new WebSocket(url, { headers: JSON.parse(headersJson), perMessageDeflate: false });

socket.on("error", (err) => {
  console.error(err.message);
  process.exit(1);
});

socket.on("open", async () => {
  const next = () => new Promise((resolve) => socket.once("message", resolve));
  const latencies = [];
  for (let i = 0; i < Number(roundTrips); i++) {
    const started = process.hrtime.bigint();
    const answered = next();
    socket.send("x");
    await answered;
    latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  latencies.sort((a, b) => a - b);
  const total = Number(messages);
  let sent = 0;
  let received = 0;
  const started = process.hrtime.bigint();
  await new Promise((resolve) => {
    socket.on("message", () => {
      received += 1;
      if (sent < total) { sent += 1; socket.send("m"); }
      if (received === total) resolve();
    });
    for (; sent < Math.min(Number(window), total); sent++) socket.send("m");
  });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  console.log(JSON.stringify({ p50_ms: latencies[Math.floor(latencies.length / 2)], rate: total / seconds }));
  socket.close();
});
