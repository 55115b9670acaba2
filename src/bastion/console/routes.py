"""The console's routes: sign-in and static files open to anyone, every other page only
to a signed-in session (visits.page). The app serves them on the admin listener when there
is one, else on the single listener (api/app.py's routes_of)."""

from __future__ import annotations

from starlette.routing import Route

from bastion.console import manage, observe, signin
from bastion.console.visits import page

POST = ("POST",)


routes = [
    Route("/console/sign-in", signin.sign_in_page, methods=["GET"]),
    Route("/console/sign-in", signin.sign_in, methods=["POST"]),
    Route("/console/sso/start", signin.sso_start, methods=["GET"]),
    Route("/console/sso/callback", signin.sso_callback, methods=["GET"]),
    Route("/console/static/{name}", signin.static_file, methods=["GET"]),
    page("/console", observe.overview),
    page("/console/sign-out", signin.sign_out, methods=POST),
    page("/console/tenants", manage.tenants),
    page("/console/tenants", manage.create_tenant, methods=POST, back="/console/tenants"),
    page("/console/tenants/{name}", manage.tenant),
    page(
        "/console/tenants/{name}/disable",
        manage.disable_tenant,
        methods=POST,
        back="/console/tenants",
    ),
    page("/console/keys", manage.keys),
    page("/console/keys", manage.create_key, methods=POST, back="/console/keys"),
    page("/console/keys/{key_id}/revoke", manage.revoke_key, methods=POST, back="/console/keys"),
    page("/console/keys/{key_id}/rotate", manage.rotate_key, methods=POST, back="/console/keys"),
    page("/console/quotas", manage.quotas),
    page("/console/quotas", manage.set_quota, methods=POST, back="/console/quotas"),
    page("/console/quotas/remove", manage.remove_quota, methods=POST, back="/console/quotas"),
    page("/console/models", observe.models),
    page(
        "/console/models/{name}/state",
        observe.set_model_state,
        methods=POST,
        back="/console/models",
    ),
    page("/console/usage", observe.usage),
    page("/console/security", observe.security),
    page("/console/audit", observe.audit),
    page("/console/audit/verify", observe.verify_audit, methods=POST, back="/console/audit"),
    page("/console/sessions", manage.sessions),
    page(
        "/console/sessions/{session}/end",
        manage.end_session,
        methods=POST,
        back="/console/sessions",
    ),
]
