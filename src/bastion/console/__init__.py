"""The admin console: a server-rendered web application at /console (docs/console.md).

It signs people in with an admin or tenant-admin API key, or through the OpenID Connect
provider (identity/oidc.py), keeps their sessions on the server (sessions.py), and serves
pages over the same services and authorization as the admin API: a tenant's admins see and
change their own tenant only, and every change is audited with the session's principal as
its actor. Pages are Jinja2 templates rendered with autoescaping; the only script and style
are files served from this package, under a Content-Security-Policy without inline code
(guard.py, which also holds the cookies and the CSRF checks).
"""
