"""The dashboard's session cookie: an HTTP route that sets it HttpOnly, and the page scripts that call it.

Why a route: Streamlit talks to the browser over a WebSocket, and a cookie written by a page
script or a component (``document.cookie``, as streamlit-authenticator's did) can never be
HttpOnly, so any script on the page could read and replay it. Only an HTTP response can set an
HttpOnly cookie, so the dashboard is served through :mod:`dashboard.server` (``st.App`` with
this module's route added beside Streamlit's own).

The exchange, after a password sign-in (:func:`data.sessions.start`):

1. the signed-in page runs :func:`grant_script` once: a ``fetch`` POST of the one-time grant
   (a minute's life) to :data:`ROUTE`;
2. the route redeems the grant (:func:`data.sessions.redeem_grant`) and answers with
   ``Set-Cookie: labtrend_session=<random token>; HttpOnly; SameSite=Strict; Path=/;
   Max-Age=<until the session's absolute end>`` (``Secure`` when the request came over HTTPS,
   directly or through a TLS proxy that says so in ``X-Forwarded-Proto``);
3. a later page load sends the cookie with the WebSocket handshake; the app reads it with
   ``st.context.cookies`` (server side) and resumes the session if the store still says it is live.

The token itself never passes through a page script; only its SHA-256 is stored. The route
answers only requests that carry the ``X-LabTrend-Session`` header, which a cross-site form
cannot send and a cross-site ``fetch`` cannot send without a CORS preflight that this server
does not grant. ``{"action": "clear"}`` expires the cookie (after sign-out or an ended session;
the session itself is already revoked in the store, so a copy of the cookie is worthless).
"""

from __future__ import annotations

import json

from data import sessions, settings
from data.db import Store, StoreSettings

__all__ = ["COOKIE_NAME", "ROUTE", "HEADER", "routes", "grant_script", "clear_script", "idle_reload_script"]

COOKIE_NAME = "labtrend_session"
ROUTE = "/_labtrend/session"  # under server.baseUrlPath when one is set
HEADER = "X-LabTrend-Session"

_stores: dict[str, Store] = {}


def _store() -> Store:
    path = str(settings.db_path())
    if path not in _stores:
        _stores[path] = Store(StoreSettings(path=path))
    return _stores[path]


def _secure(request) -> bool:
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or proto == "https"


def _cookie_path(base: str) -> str:
    return f"/{base.strip('/')}/" if base.strip("/") else "/"


async def _session_endpoint(request, path: str):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response

    if request.headers.get(HEADER.lower()) != "1":
        return JSONResponse({"detail": f"missing {HEADER} header"}, status_code=403)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
    if isinstance(body, dict) and body.get("action") == "clear":
        response = Response(status_code=204, headers={"Cache-Control": "no-store"})
        response.delete_cookie(COOKIE_NAME, path=path, secure=_secure(request), httponly=True, samesite="strict")
        return response
    grant = body.get("grant") if isinstance(body, dict) else None
    if not isinstance(grant, str):
        return JSONResponse({"detail": "give a grant or action 'clear'"}, status_code=400)
    now = sessions.utcnow()
    redeemed = await run_in_threadpool(sessions.redeem_grant, _store(), grant, now=now)
    if redeemed is None:
        return JSONResponse({"detail": "unknown, used or expired grant"}, status_code=403)
    token, session = redeemed
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE_NAME, token, max_age=max(1, int((session.expires_at - now).total_seconds())),
                        path=path, secure=_secure(request), httponly=True, samesite="strict")
    return response


def routes(base_url_path: str = "") -> list:
    """The Starlette routes to add to ``st.App`` (``base_url_path``: Streamlit's ``server.baseUrlPath``)."""
    from starlette.routing import Route

    path = _cookie_path(base_url_path)

    async def endpoint(request):
        return await _session_endpoint(request, path)

    return [Route(_route_url(base_url_path), endpoint, methods=["POST"])]


def _route_url(base_url_path: str) -> str:
    base = base_url_path.strip("/")
    return (f"/{base}" if base else "") + ROUTE


def _post_script(base_url_path: str, body: dict, mark: str) -> str:
    """A page script that POSTs ``body`` to the route and records the outcome on ``<html data-labtrend-session>``."""
    return (
        "<script>(async () => {const root = document.documentElement;"
        "try {const r = await fetch(" + json.dumps(_route_url(base_url_path)) + ", {method: 'POST', "
        "credentials: 'same-origin', cache: 'no-store', headers: {'Content-Type': 'application/json', "
        + json.dumps(HEADER) + ": '1'}, body: " + json.dumps(json.dumps(body)) + "});"
        "root.dataset.labtrendSession = r.ok ? " + json.dumps(mark) + " : 'failed ' + r.status;"
        "} catch (e) {root.dataset.labtrendSession = 'failed';}})();</script>"
    )


def grant_script(grant: str, base_url_path: str = "") -> str:
    """The script that exchanges ``grant`` for the HttpOnly cookie (sets ``data-labtrend-session="set"``)."""
    return _post_script(base_url_path, {"grant": grant}, "set")


def clear_script(base_url_path: str = "") -> str:
    """The script that expires the cookie (sets ``data-labtrend-session="cleared"``)."""
    return _post_script(base_url_path, {"action": "clear"}, "cleared")


def idle_reload_script(idle_seconds: float, run_marker: int) -> str:
    """Reload the page once ``idle_seconds`` (+5 s) pass without a page run, so that a screen left
    signed in falls back to the sign-in form by itself (the server has ended the session by then).
    ``run_marker`` differs on every run, so that the script runs again and pushes the deadline; a key
    pressed in the last minute postpones the reload by a minute (a long comment being typed is not
    thrown away; the server still ends the session on time)."""
    ms = int((idle_seconds + 5) * 1000)
    return (
        "<script>(() => {/* run " + str(int(run_marker)) + " */"
        "window.__labtrendIdleDeadline = Date.now() + " + str(ms) + ";"
        "if (window.__labtrendIdleTimer) return;"
        # never under someone's fingers: typing (which reaches the server only later) postpones the reload
        "window.addEventListener('keydown', () => {window.__labtrendIdleDeadline = "
        "Math.max(window.__labtrendIdleDeadline, Date.now() + 60000);}, {capture: true, passive: true});"
        "window.__labtrendIdleTimer = setInterval(() => {"
        "if (Date.now() > window.__labtrendIdleDeadline) {clearInterval(window.__labtrendIdleTimer);"
        "window.location.reload();}}, 10000);})();</script>"
    )
