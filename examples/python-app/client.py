"""A client of the app, through wsgate: sends its token as the first message, then talks.

    python examples/python-app/client.py [--url wss://127.0.0.1:8443/] [--ca certs/dev/server.crt]
        [--secret-file certs/dev/jwt.secret] [--user-id 42] [--hold] [MESSAGE ...]

The token is an HS256 JWT of {"user_id": <id>}, signed with the gateway's secret: the file
(trailing whitespace stripped, as wsgate does), or $WSGATE_JWT_SECRET when set and no
--secret-file is given. Each MESSAGE (default "Hello") is sent and its reply printed.
With --hold the session stays open until stdin reaches end of file.
Exit status: 0 after a clean close; 1 when the connection is closed on us (the close
code and reason go to stderr, e.g. "closed: 1008 authentication failed").
"""

import argparse
import asyncio
import os
import ssl
import sys

import jwt
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def read_secret(args):
    if args.secret_file is None and "WSGATE_JWT_SECRET" in os.environ:
        return os.environ["WSGATE_JWT_SECRET"].encode()
    with open(args.secret_file or "certs/dev/jwt.secret", "rb") as f:
        return f.read().rstrip()


async def main(args):
    token = jwt.encode({"user_id": args.user_id}, read_secret(args), algorithm="HS256")
    # Trust the gateway's certificate (the self-signed development one by default).
    tls = ssl.create_default_context(cafile=args.ca)
    try:
        async with connect(args.url, ssl=tls, open_timeout=10, close_timeout=5) as websocket:
            await websocket.send(token)  # the first message: checked by wsgate, never forwarded
            for message in args.messages or ["Hello"]:
                await websocket.send(message)
                print(await websocket.recv(), flush=True)
            if args.hold:
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    except ConnectionClosed as e:
        close = e.rcvd
        print(f"closed: {close.code if close else 'no close frame'} {close.reason if close else ''}".rstrip(),
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="wss://127.0.0.1:8443/", help="the gateway (default: %(default)s)")
    parser.add_argument("--ca", default="certs/dev/server.crt", help="CA file the gateway's certificate is checked against (default: %(default)s)")
    parser.add_argument("--secret-file", help="HS256 secret (default: certs/dev/jwt.secret)")
    parser.add_argument("--user-id", type=int, default=42, help="the token's user_id (default: %(default)s)")
    parser.add_argument("--hold", action="store_true", help="keep the session open until stdin closes")
    parser.add_argument("messages", nargs="*", metavar="MESSAGE", help='sent in order, each reply printed (default: "Hello")')
    sys.exit(asyncio.run(main(parser.parse_args())))
