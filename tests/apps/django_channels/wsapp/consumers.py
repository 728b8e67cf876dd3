import json

from channels.generic.websocket import AsyncWebsocketConsumer


class EchoConsumer(AsyncWebsocketConsumer):
    """Echoes each text message with who the app thinks the user is: the session's user
    (scope["user"]) and every X-User-Id header that reached the app (the gateway's copy of
    the /ws-auth/ answer; a client's own is removed by the gateway)."""

    async def connect(self):
        if not self.scope["user"].is_authenticated:
            await self.close(code=4403)  # never reached behind wsgate: it asked /ws-auth/ first
            return
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        headers = self.scope["headers"]
        await self.send(
            text_data=json.dumps(
                {
                    "echo": text_data,
                    "user": self.scope["user"].get_username(),
                    "x_user_id": [v.decode("latin-1") for k, v in headers if k.lower() == b"x-user-id"],
                }
            )
        )


class NoConsumer(AsyncWebsocketConsumer):
    """No consumer on this path: refused before the handshake (daphne answers 403)."""

    async def connect(self):
        await self.close()
