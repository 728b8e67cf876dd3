"""HTTP goes to Django's views; websockets under /ws/ to the consumer, with the session user
in scope["user"] (AuthMiddlewareStack reads the same session cookie the gateway passed to
/ws-auth/: wsgate forwards the client's Cookie upstream on a forward-auth route)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "wsapp.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (after Django is set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from .consumers import EchoConsumer, NoConsumer  # noqa: E402

# No AllowedHostsOriginValidator: the gateway checks Origin (the route's allowed_origins)
# before anything reaches the app.
application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AuthMiddlewareStack(
            URLRouter(
                [
                    path("ws/echo/", EchoConsumer.as_asgi()),
                    # Every other path: a 403, not URLRouter's exception (daphne's 500, which
                    # the gateway counts as an upstream failure: three and the route's
                    # upstream is backed off, login pages included).
                    re_path(r"", NoConsumer.as_asgi()),
                ]
            )
        ),
    }
)
