"""The existing app: a plain `websockets` server that answers every message.

    python examples/python-app/app.py [--host 127.0.0.1] [--port 8765]

(or APP_HOST / APP_PORT). It knows nothing about TLS or tokens: wsgate sits in front of it.
It prints one line per connection and per message, so you can see what reaches it;
`--port 0` picks a free port and the "listening on" line says which.
"""

import argparse
import asyncio
import os

from websockets.asyncio.server import serve


def log(line):
    print(line, flush=True)


def log_connection(connection, request):
    # Runs during the opening handshake, before the app answers 101.
    log(f"connection {request.path}")


async def handler(websocket):
    async for message in websocket:
        log(f"received {message!r}")
        await websocket.send(f"Server received: {message}")


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("APP_HOST", "127.0.0.1"), help="default: $APP_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("APP_PORT", "8765")),
                        help="default: $APP_PORT or 8765; 0 picks a free port")
    args = parser.parse_args()
    async with serve(handler, args.host, args.port, process_request=log_connection) as server:
        host, port = server.sockets[0].getsockname()[:2]
        log(f"listening on ws://{host}:{port}")
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
