from urllib.parse import quote

from django.contrib.auth import authenticate, login, logout
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.http import require_GET, require_http_methods, require_POST


@require_http_methods(["GET", "POST"])
def login_view(request):
    """GET: the CSRF token (and its cookie) a login form would carry. POST: username and
    password, with that token (Django's CSRF check, as for any form) → a session cookie."""
    if request.method == "GET":
        return JsonResponse({"csrf": get_token(request)})
    user = authenticate(request, username=request.POST.get("username"), password=request.POST.get("password"))
    if user is None:
        return JsonResponse({"ok": False}, status=401)
    login(request, user)  # a new session (sessionid cookie) and a new CSRF token (csrftoken cookie)
    return JsonResponse({"ok": True, "user": user.get_username(), "csrf": get_token(request)})


@require_POST
def logout_view(request):
    logout(request)  # deletes the session row: /ws-auth/ answers 401 for that cookie from now on
    return JsonResponse({"ok": True})


@require_GET
def ws_auth(request):
    """wsgate's forward-auth endpoint: asked with the client's Cookie (and Origin,
    Authorization, X-Forwarded-*) before each upgrade and every `recheck` while the socket lives.
    200 + X-User-Id admits; 401 refuses (and closes live sockets with 1008).
    The gateway never reads the body; a 302 to a login page would be a 401 for an upgrade."""
    if not request.user.is_authenticated:
        return HttpResponse(status=401)
    response = HttpResponse(status=200)
    # Percent-encoded UTF-8: wsgate takes only UTF-8 text as an identity, and Django writes a
    # header value as Latin-1 bytes (or an RFC 2047 word beyond Latin-1). "alice" stays
    # "alice"; "josé" is "jos%C3%A9" (one spelling per user: "%" itself is encoded).
    response["X-User-Id"] = quote(request.user.get_username(), safe="@.+-_")
    return response
