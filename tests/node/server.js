// A Socket.IO 4.8 app node for tests/python/test_socketio.py, run behind wsgate.
//
//   node server.js --name A            listens on 127.0.0.1 on a free port (port 0)
//
// Prints one JSON line {"listening": PORT, "name": NAME} on stdout when ready. Socket.IO is
// on /socket.io/ with its defaults (polling, then the upgrade to websocket); GET /stats on the
// same port (asked directly, not through wsgate) answers what this node saw:
//   connections        Socket.IO connections (after the handshake and the CONNECT packet)
//   upgrades           Engine.IO sessions that upgraded to websocket
//   unknown_sid        Engine.IO requests refused with 400 "Session ID unknown" (a poll or
//                      an upgrade that reached the wrong node); also printed as they happen
//   connection_errors  every Engine.IO refusal by code ({"1": n} is unknown_sid)
//   subs               the x-wsgate-sub header (forward_claims) of each connection
// Events: "echo" (answers the ack with {node, n, data, transport}); on connection the node
// emits "welcome" {node}.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const name = arg("name", "node");
const stats = { name, connections: 0, upgrades: 0, unknown_sid: 0, connection_errors: {}, subs: [], events: 0 };

const httpServer = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/stats") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(stats));
    return;
  }
  // Socket.IO handles /socket.io/ before this handler; anything else is not ours.
  if (!req.url.startsWith("/socket.io/")) {
    res.writeHead(404);
    res.end();
  }
});

const io = new Server(httpServer, {}); // defaults: transports ["polling", "websocket"], pingInterval 25 s

io.engine.on("connection_error", (err) => {
  const code = String(err.code);
  stats.connection_errors[code] = (stats.connection_errors[code] || 0) + 1;
  if (err.code === 1) stats.unknown_sid += 1; // Server.errors.UNKNOWN_SID → 400 "Session ID unknown"
  console.log(JSON.stringify({ connection_error: err.code, message: err.message, url: err.req && err.req.url }));
});

io.on("connection", (socket) => {
  stats.connections += 1;
  stats.subs.push(socket.handshake.headers["x-wsgate-sub"] || null);
  socket.conn.once("upgrade", () => {
    stats.upgrades += 1;
  });
  socket.emit("welcome", { node: name });
  let n = 0;
  socket.on("echo", (data, ack) => {
    n += 1;
    stats.events += 1;
    if (typeof ack === "function") ack({ node: name, n, data, transport: socket.conn.transport.name });
  });
});

httpServer.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: httpServer.address().port, name }));
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    io.close();
    process.exit(0);
  });
}
