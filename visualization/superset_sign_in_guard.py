"""Keep a browser's sign-in from being undone by Superset's own event beacon.

Superset's pages send their usage events to ``/superset/log/`` with ``navigator.sendBeacon``, the login page too:
when the sign-in form is submitted, that page's beacon leaves with the anonymous session cookie at about the same
moment as the form. ``/superset/log/`` is for signed-in users, so Superset answers the beacon "Access is Denied":
a redirect to the login page, which the beacon follows, each answer writing the anonymous session back as a new
cookie. When one of these arrives after the sign-in's (checking the password is the slowest of the three, but a
busy server reorders them), it replaces the signed-in cookie. The welcome page's API calls then get 401, Superset's
client sends the browser back to the login page, and the login page says "Invalid username or password" (it says so
whenever it opens after a sign-in attempt). Seen here on 2 of 7 first sign-ins on a fresh server busy with other
work, and once in a CI run of the dashboards' end-to-end test.

The same message also showed where no password was refused: the login page decides to say it from a flag it
leaves in ``sessionStorage`` at every submit and clears only when it opens again, so after a successful sign-in
the next login page of that tab (after "Log out", or when the session ends) said "Invalid username or password".

`install(app)` registers three hooks: a beacon from a browser that is not signed in is answered 204 at once (no
redirect: Superset would not record its events anyway); an answer to the beacon never sets the session cookie (the
beacon carries nothing a session should keep); and a login page that does not follow a refused password (Flask-
AppBuilder flashes its "Invalid login" message into the session for that) starts with a script, under the page's
CSP nonce, that removes that one stale flag before the page's own code reads it. (``Clear-Site-Data: "storage"``
would do it too, but it also empties the origin's local storage and service workers whenever a session ends.) The
flashed messages, which Superset's pages never show, are taken out of the session there.

This file runs inside Superset's virtualenv: the generated ``superset_config.py`` loads it by path and calls
`install(app)` from ``FLASK_APP_MUTATOR``. It imports only Flask, Flask-Login and Flask-AppBuilder.
"""
from __future__ import annotations

EVENT_BEACON_PATH = "/superset/log/"  # Superset's event log endpoint (views/core.py `Superset.log`)
LOGIN_PAGE_PATH = "/login/"
LOGIN_ATTEMPT_FLAG = "login_attempted"  # the sessionStorage key Superset 6.1's login page sets at submit and reads


def install(app) -> None:
    """Answer beacons of browsers not signed in with 204, let no answer to a beacon set the session cookie, and
    remove the login page's stale flag of an attempt unless the page follows a refused password."""
    from flask import Response, request, session
    from flask_appbuilder.security.views import AuthView
    from flask_login import current_user

    @app.before_request
    def beacon_of_a_browser_not_signed_in_gets_no_redirect():
        if request.path == EVENT_BEACON_PATH and not current_user.is_authenticated:
            return Response(status=204)
        return None

    @app.after_request
    def beacon_keeps_the_session_cookie(response):
        if request.path == EVENT_BEACON_PATH:
            session.modified = False  # Flask writes the cookie only for a modified (non-permanent) session
        return response

    @app.after_request
    def login_page_forgets_earlier_attempts(response):
        if (request.method == "GET" and request.path == LOGIN_PAGE_PATH and response.status_code == 200
                and response.mimetype == "text/html" and not response.direct_passthrough):
            flashed = session.pop("_flashes", [])
            refused = str(AuthView.invalid_login_message)
            if not any(str(message) == refused for _, message in flashed):
                nonce = getattr(request, "csp_nonce", "")  # Talisman's, the one its CSP header names
                script = f'<script nonce="{nonce}">sessionStorage.removeItem("{LOGIN_ATTEMPT_FLAG}")</script>'
                response.set_data(response.get_data(as_text=True).replace("<head>", "<head>" + script, 1))
        return response
