// socket.io-client 4.8 with its DEFAULT transports (polling first, then the upgrade to
// websocket), many clients at once, through wsgate over TLS. For tests/python/test_socketio.py.
//
//   node client.js --url https://127.0.0.1:PORT --ca server.crt --tokens tokens.json [--events 6]
//
// tokens.json is a JSON list of JWTs, one per client (each sent as `Authorization: Bearer`
// on every poll and on the upgrade, through extraHeaders). withCredentials: true keeps the
// gateway's sticky cookie (Node's client has a cookie jar only then). Each client:
// starts on polling (checked), connects, waits for "welcome", emits half its events (acked)
// while it may still be polling, waits for the upgrade to websocket, emits the other half, checks every ack, and
// disconnects. Prints one JSON summary line; exits 0 only if every client passed.
"use strict";

const fs = require("node:fs");
const { io } = require("socket.io-client");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const url = arg("url");
const ca = fs.readFileSync(arg("ca"));
const tokens = JSON.parse(fs.readFileSync(arg("tokens"), "utf8"));
const events = Number(arg("events", "6"));
const STEP_MS = 15000; // any single wait: connect, welcome, ack, upgrade

function withTimeout(promise, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${STEP_MS} ms`)), STEP_MS);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

async function runClient(i, token) {
  const socket = io(url, {
    // transports left at the default: ["polling", "websocket"], upgrade: true
    extraHeaders: { Authorization: `Bearer ${token}` },
    withCredentials: true,
    ca,
    reconnection: false,
    timeout: STEP_MS,
  });
  const result = { client: i, nodes: [], first_transport: null, upgraded: false, final_transport: null, acks: 0, error: null };
  // The engine is made inside io(): its first transport is what the client starts on.
  result.first_transport = socket.io.engine.transport.name;
  const upgraded = new Promise((resolve) =>
    socket.io.engine.once("upgrade", (t) => {
      result.upgraded = t.name === "websocket";
      resolve();
    }),
  );
  try {
    const welcome = withTimeout(new Promise((resolve) => socket.once("welcome", resolve)), "welcome");
    await withTimeout(
      new Promise((resolve, reject) => {
        socket.once("connect", resolve);
        socket.once("connect_error", (e) => reject(new Error(`connect_error: ${e.message}`)));
      }),
      "connect",
    );
    result.nodes.push((await welcome).node);
    for (let n = 1; n <= events; n++) {
      if (n === Math.floor(events / 2) + 1) await withTimeout(upgraded, "upgrade to websocket");
      const data = { client: i, n };
      const ack = await socket.timeout(STEP_MS).emitWithAck("echo", data);
      if (JSON.stringify(ack.data) !== JSON.stringify(data) || ack.n !== n) {
        throw new Error(`ack ${n} does not match: ${JSON.stringify(ack)}`);
      }
      result.nodes.push(ack.node);
      result.acks += 1;
    }
    result.final_transport = socket.io.engine.transport.name;
  } catch (e) {
    result.error = String(e && e.message ? e.message : e);
  } finally {
    socket.disconnect();
  }
  return result;
}

(async () => {
  const overall = setTimeout(() => {
    console.log(JSON.stringify({ error: "client.js overall timeout" }));
    process.exit(3);
  }, 4 * STEP_MS + 10000);
  const results = await Promise.all(tokens.map((t, i) => runClient(i, t)));
  clearTimeout(overall);
  const ok = results.every(
    (r) =>
      !r.error &&
      r.acks === events &&
      r.first_transport === "polling" &&
      r.upgraded &&
      r.final_transport === "websocket" &&
      new Set(r.nodes).size === 1,
  );
  console.log(JSON.stringify({ ok, results }));
  process.exit(ok ? 0 : 1);
})();
