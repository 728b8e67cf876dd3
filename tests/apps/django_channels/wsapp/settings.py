"""A small Django Channels app behind wsgate with forward auth (README.md, "Cookie sessions,
opaque tokens and OIDC"). Plain Django session login; the gateway asks /ws-auth/ before each
upgrade and again every `recheck`.

Environment: WSAPP_DB (the sqlite file, default ./db.sqlite3), WSAPP_SECRET_KEY (required
outside tests: sessions are signed with it).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("WSAPP_SECRET_KEY", "test-only-not-secret-" + "x" * 40)
DEBUG = False
# The gateway asks /ws-auth/ with Host = the url's authority (127.0.0.1:PORT here), and
# opens the upstream socket with the upstream's address; clients never reach daphne directly.
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "channels",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

ROOT_URLCONF = "wsapp.urls"
ASGI_APPLICATION = "wsapp.asgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("WSAPP_DB", str(BASE_DIR / "db.sqlite3")),
    }
}

# Database-backed sessions (Django's default): logout deletes the session row, so the
# gateway's next recheck of a live socket gets 401 and closes it with 1008.
SESSION_ENGINE = "django.contrib.sessions.backends.db"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# Behind wsgate Django sees the upstream address as Host (127.0.0.1:8000), so its CSRF check
# cannot match the browser's Origin by itself: name the site's origin (the gateway's).
CSRF_TRUSTED_ORIGINS = os.environ.get("WSAPP_SITE_ORIGINS", "https://127.0.0.1:8443").split()

# Production: True (the browser only sends the cookie over https, which wsgate terminates).
# The test logs in to daphne over plain http on loopback, so it is off here.
SESSION_COOKIE_SECURE = os.environ.get("WSAPP_SECURE_COOKIES") == "1"

# No channel layer is needed: the consumer only echoes.
USE_TZ = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
