"""A python-socketio app node (AsyncServer on aiohttp) for test_socketio.py, run behind wsgate.

    python socketio_app.py --name A       listens on 127.0.0.1 on a free port (port 0)

Prints one JSON line {"listening": PORT, "name": NAME} when ready. Socket.IO is on /socket.io/
with its defaults (polling, then the upgrade to websocket). GET /stats on the same port (asked
directly, not through wsgate) answers what this node saw: connections, upgrades (sessions
that sent an event over websocket), bad_requests (every 400 answered on /socket.io/: an unknown
session id is one), subs (the x-wsgate-sub header of each connection) and events.
Events: "echo" answers its ack with {node, n, data, transport}; on connect the node emits
"welcome" {node}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import socketio
from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="node")
    name = parser.parse_args().name
    stats = {"name": name, "connections": 0, "upgrades": 0, "bad_requests": 0, "subs": [], "events": 0}
    counts: dict[str, int] = {}
    upgraded: set[str] = set()

    sio = socketio.AsyncServer(async_mode="aiohttp")  # defaults: polling + websocket

    @web.middleware
    async def count_400(request, handler):
        resp = await handler(request)
        if request.path.startswith("/socket.io/") and resp.status == 400:
            stats["bad_requests"] += 1
            print(json.dumps({"bad_request": request.path_qs}), flush=True)
        return resp

    app = web.Application(middlewares=[count_400])
    sio.attach(app)

    async def get_stats(_request):
        return web.json_response(stats)

    app.router.add_get("/stats", get_stats)

    @sio.event
    async def connect(sid, environ):
        stats["connections"] += 1
        stats["subs"].append(environ.get("HTTP_X_WSGATE_SUB"))
        counts[sid] = 0
        await sio.emit("welcome", {"node": name}, to=sid)

    @sio.event
    async def echo(sid, data):
        counts[sid] = counts.get(sid, 0) + 1
        stats["events"] += 1
        transport = sio.transport(sid)
        if transport == "websocket":
            upgraded.add(sid)
            stats["upgrades"] = len(upgraded)
        return {"node": name, "n": counts[sid], "data": data, "transport": transport}

    @sio.event
    async def disconnect(sid, *args):
        counts.pop(sid, None)

    async def serve() -> None:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(json.dumps({"listening": port, "name": name}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
