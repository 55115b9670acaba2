"""The admin console in a real browser: Debian's headless Chromium driven by Playwright,
against a real `bastion serve` on loopback, with single sign-on through the test OIDC
provider (tests/oidc_provider.py).

Sign-in with a key and with SSO, tenants and keys (the secret shown once, revoked), a
security event, a tenant's admin kept to its tenant (in lists and by URL), CSRF, a
consumer key refused, a session ended by its key's revocation, the CSP and the cookies;
then, over TLS with an admin listener, the console on the admin listener only and its
__Host- cookies. The last test saves screenshots of the main pages (build/console-screenshots,
or docs/console/ for the ones docs/console.md shows: `make console-screenshots`).

Playwright's own browser downloads are not used: `make chromium-deps` installs Debian's
chromium, which these tests launch.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Response, sync_playwright

from bastion.identity.keys import generate_api_key
from bastion_testing import BastionServer, add_echo_model, free_port, run_cli
from oidc_provider import Client, ManualClock, OidcProvider

CHROMIUM = Path("/usr/bin/chromium")
# Every run saves them under build/ (ignored by git); `make console-screenshots` runs this
# test with BASTION_CONSOLE_SCREENSHOTS=docs/console to refresh the ones the docs show.
SCREENSHOTS = Path(
    os.environ.get(
        "BASTION_CONSOLE_SCREENSHOTS",
        Path(__file__).resolve().parents[2] / "build" / "console-screenshots",
    )
)
CLIENT_ID = "bastion-console"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
KEY = re.compile(r"bsk_[0-9a-f]{16}_[a-z2-7]{52}")


def scaling_onnx(path: Path) -> Path:
    """A tiny ONNX model (output = input * 3) in its own folder."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "factor"], ["output"])],
        "scale",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("factor", TensorProto.FLOAT, [1], [3.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.mkdir()
    onnx.save(model, str(path / "model.onnx"))
    return path


class WallClock(ManualClock):
    """The provider's tokens dated now: Bastion checks them against its own clock."""

    def __call__(self) -> float:
        return time.time()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def provider(port: int) -> Iterator[OidcProvider]:
    client = Client(CLIENT_ID, redirect_uris=(f"http://127.0.0.1:{port}/console/sso/callback",))
    with OidcProvider(clock=WallClock(), clients=[client]) as found:
        yield found


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, port: int, provider: OidcProvider
) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("console") / "home"
    run_cli(home, "init", "--no-demo-models")
    add_echo_model(home)
    # Two signed bundles for the models page: one served, one whose file was tampered with.
    source = scaling_onnx(home.parent / "scale")
    run_cli(home, "models", "import", str(source), "--name", "scale", "--runtime", "onnx")
    run_cli(home, "models", "import", str(source), "--name", "broken", "--runtime", "onnx")
    blob = next((home / "bundles/broken/1/blobs").iterdir())
    data = bytearray(blob.read_bytes())
    data[-3] ^= 1
    blob.write_bytes(data)
    found = BastionServer(
        home,
        "--no-demo-models",
        port=port,
        env={
            "BASTION_JWT_ISSUER": provider.issuer,
            "BASTION_OIDC_CLIENT_ID": CLIENT_ID,
            "BASTION_OIDC_REDIRECT_URL": f"http://127.0.0.1:{port}/console/sso/callback",
        },
    )
    try:
        found.wait_ready(["echo", "scale"], timeout=180)
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the console's browser tests need Debian's chromium at {CHROMIUM}: "
            "run make chromium-deps"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def context(browser: Browser, server: BastionServer) -> Iterator[BrowserContext]:
    found = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 860})
    try:
        yield found
    finally:
        found.close()


def admin_api(server: BastionServer) -> httpx.Client:
    return server.admin_client()


def create(server: BastionServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with admin_api(server) as api:
        response = api.post(path, json=body)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    return found


def tenant(server: BastionServer, name: str) -> None:
    with admin_api(server) as api:
        response = api.post("/admin/v1/tenants", json={"name": name})
    assert response.status_code in (201, 409), response.text


def key(server: BastionServer, tenant_name: str, role: str = "consumer") -> dict[str, Any]:
    tenant(server, tenant_name)
    return create(server, "/admin/v1/keys", {"tenant": tenant_name, "role": role})


def open_page(context: BrowserContext) -> Page:
    page = context.new_page()
    # The console's own script asks before destructive forms: say yes.
    page.on("dialog", lambda dialog: dialog.accept())
    return page


def sign_in(context: BrowserContext, secret: str) -> Page:
    page = open_page(context)
    page.goto("/console")
    assert page.url.endswith("/console/sign-in")
    page.fill("#key", secret)
    page.click("#sign-in-key")
    page.wait_for_load_state()
    return page


def flash(page: Page) -> str:
    return page.locator(".flash").first.inner_text()


def cookie(context: BrowserContext, name: str) -> dict[str, Any]:
    found = [c for c in context.cookies() if c["name"] == name]
    assert found, f"no {name} cookie in {[c['name'] for c in context.cookies()]}"
    return dict(found[0])


# ---------------------------------------------------------------- tests


def test_an_admin_creates_a_tenant_and_a_key_shown_once_then_revokes_it(
    context: BrowserContext, server: BastionServer
) -> None:
    page = sign_in(context, server.admin_key)
    assert page.url.endswith("/console")
    assert page.locator("h1").inner_text() == "Overview"
    session = cookie(context, "bastion_console")
    # Plain HTTP on loopback: the cookie cannot be Secure (over TLS: the next tests).
    assert (session["httpOnly"], session["sameSite"], session["secure"]) == (True, "Strict", False)
    assert session["path"] == "/"

    page.click("nav >> text=Tenants")
    page.fill("#tenant-name", "globex")
    page.click("#create-tenant")
    assert flash(page) == "Tenant globex created."
    assert page.locator("tr[data-tenant=globex]").count() == 1

    page.goto("/console/keys?tenant=globex")
    page.fill("#key-name", "ci pipeline")
    page.select_option("#key-role", "consumer")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("#create-key")
    answer: Response = posted.value
    assert answer.status == 201
    assert answer.headers["cache-control"] == "no-store"
    token = page.locator("#new-key").inner_text().strip()
    key_id = page.locator("#new-key-id").inner_text()
    assert KEY.fullmatch(token) and token.startswith(f"bsk_{key_id}_")
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {token}"}) as api:
        assert api.get("/v1/models").status_code == 200
        # Shown once: the keys page lists the id, never the secret.
        page.click("#back-to-keys")
        assert key_id in page.content() and token not in page.content()
        page.locator(f"tr[data-key='{key_id}'] button:has-text('Revoke')").click()
        page.wait_for_load_state()
        assert flash(page) == f"Key {key_id} revoked."
        assert page.locator(f"tr[data-key='{key_id}'] .pill").inner_text() == "revoked"
        assert api.get("/v1/models").status_code == 401
    # The console's changes are audited with its session's principal as the actor.
    page.goto("/console/audit")
    admin_id = server.admin_key[4:20]
    records = page.locator("#audit-records").inner_text()
    assert re.search(rf"key\.revoked\s+success\s+{admin_id}\s+globex\s+{key_id}", records)
    assert re.search(rf"tenant\.created\s+success\s+{admin_id}\s+globex", records)
    # The key typed into the sign-in form, and the new key's secret, are in no log.
    logs = server.logs()
    assert server.admin_key[21:] not in logs and token[21:] not in logs


def test_a_failed_sign_in_and_a_consumer_key_are_refused_and_shown_as_security_events(
    browser: Browser, context: BrowserContext, server: BastionServer
) -> None:
    stranger = browser.new_context(base_url=server.url)
    try:
        bogus = generate_api_key()
        page = sign_in(stranger, bogus.token)
        assert page.url.endswith("/console/sign-in")
        assert page.locator("#sign-in-error").inner_text() == "Invalid or missing API key."
        consumer = key(server, "acme")
        page.fill("#key", consumer["key"])
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.click("#sign-in-key")
        assert posted.value.status == 403
        assert "Only admin and tenant-admin" in page.locator("#sign-in-error").inner_text()
        assert not [c for c in stranger.cookies() if c["name"] == "bastion_console"]
    finally:
        stranger.close()
    # Ten wrong secrets for one key id within a minute: an alert (docs/alerts.md).
    guessed = f"bsk_{consumer['id']}_{generate_api_key().secret}"
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {guessed}"}) as api:
        for _ in range(10):
            assert api.get("/v1/models").status_code == 401
    page = sign_in(context, server.admin_key)
    page.goto("/console/security")
    events = page.locator("#security-events").inner_text()
    assert re.search(rf"auth\.failed\s+failure\s+{bogus.public_id}", events)
    assert re.search(rf"auth\.denied\s+failure\s+{consumer['id']}\s+acme", events)
    alerts = page.locator("#alerts").inner_text()
    assert "auth_failures_per_key" in alerts and consumer["id"] in alerts


def test_a_tenant_admin_sees_only_its_own_tenant(
    context: BrowserContext, server: BastionServer
) -> None:
    own = key(server, "initech", role="tenant-admin")
    other = key(server, "umbrella")
    page = sign_in(context, own["key"])
    assert page.url.endswith("/console")
    page.goto("/console/tenants")
    assert page.locator("#tenants tbody tr").all_inner_texts()[0].startswith("initech")
    assert page.locator("#tenants tbody tr").count() == 1
    page.goto("/console/keys")
    listed = page.locator("#keys").inner_text()
    assert own["id"] in listed and other["id"] not in listed and "umbrella" not in listed
    # Nor by URL: another tenant is "not found", like one that does not exist.
    for path in (
        "/console/tenants/umbrella",
        "/console/keys?tenant=umbrella",
        "/console/quotas?tenant=umbrella",
        "/console/usage?tenant=umbrella",
        "/console/audit?tenant=umbrella",
    ):
        answer = page.goto(path)
        assert answer is not None and answer.status == 404, path
    # Nor by a forged form: revoking another tenant's key is refused, and it still works.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = page.request.post(
        f"/console/keys/{other['id']}/revoke",
        form={"csrf": csrf or ""},
        headers={"origin": server.url},
        max_redirects=0,
    )
    assert refused.status == 303
    page.goto("/console/keys")
    assert flash(page) == "No API key has this id."
    with httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {other['key']}"}
    ) as api:
        assert api.get("/v1/models").status_code == 200
    assert page.locator("form[action='/console/audit/verify']").count() == 0
    # Each reach into umbrella is recorded as a refusal, as the admin API records it.
    with admin_api(server) as admin:
        found = admin.get("/admin/v1/audit/records", params={"tenant": "initech", "limit": 1000})
    denied = [
        r["detail"]
        for r in found.json()["data"]
        if r["action"] == "auth.denied" and r["actor"] == own["id"]
    ]
    assert len(denied) == 6
    assert all(d["reason"] == "cross_tenant" and d["action"] == "console" for d in denied)


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    context: BrowserContext, server: BastionServer
) -> None:
    page = sign_in(context, server.admin_key)
    page.goto("/console/tenants")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    attempts = [
        ({"name": "forged1"}, {"origin": server.url}),
        ({"name": "forged2", "csrf": "0" * len(csrf)}, {"origin": server.url}),
        ({"name": "forged3", "csrf": csrf}, {"origin": "https://evil.example"}),
    ]
    for form, headers in attempts:
        answer = page.request.post("/console/tenants", form=form, headers=headers, max_redirects=0)
        assert answer.status == 403, form
    # The real form passes (the browser sends the page's own Origin).
    page.fill("#tenant-name", "hooli")
    page.click("#create-tenant")
    assert flash(page) == "Tenant hooli created."
    with admin_api(server) as api:
        names = {t["name"] for t in api.get("/admin/v1/tenants").json()["data"]}
    assert "hooli" in names and not names & {"forged1", "forged2", "forged3"}


def test_a_session_ends_when_its_key_is_revoked(
    context: BrowserContext, server: BastionServer
) -> None:
    own = key(server, "initech", role="tenant-admin")
    page = sign_in(context, own["key"])
    assert page.url.endswith("/console")
    with admin_api(server) as api:
        assert api.post(f"/admin/v1/keys/{own['id']}/revoke").status_code == 200
    page.goto("/console/keys")
    assert page.url.endswith("/console/sign-in?ended=revoked")
    assert "its API key was revoked" in flash(page)
    # The browser's old cookie opens nothing any more.
    assert page.goto("/console/tenants") is not None
    assert "/console/sign-in" in page.url


def test_pages_carry_the_csp_and_no_inline_script_or_style(
    context: BrowserContext, server: BastionServer
) -> None:
    violations: list[str] = []
    page = open_page(context)
    page.on("console", lambda message: violations.append(message.text))
    answer = page.goto("/console/sign-in")
    assert answer is not None
    assert answer.headers["content-security-policy"] == CSP
    pre = cookie(context, "bastion_console_pre")
    assert (pre["httpOnly"], pre["sameSite"]) == (True, "Strict")
    page.fill("#key", server.admin_key)
    page.click("#sign-in-key")
    for path in ("/console", "/console/tenants", "/console/keys", "/console/usage"):
        answer = page.goto(path)
        assert answer is not None and answer.status == 200
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["cache-control"] == "no-store"
        source = page.content()
        scripts = re.findall(r"<script\b[^>]*>", source)
        assert scripts == ['<script src="/console/static/console.js" defer="">'], scripts
        assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", source), path
    # The stylesheet and the script load under the policy (nothing was blocked).
    assert page.evaluate("getComputedStyle(document.querySelector('header.top')).display") == "flex"
    assert not [v for v in violations if "Content Security Policy" in v], violations


def test_single_sign_on_signs_a_tenant_admin_in(
    context: BrowserContext, server: BastionServer, provider: OidcProvider
) -> None:
    tenant(server, "acme")
    provider.user = {"sub": "alice", "bastion_tenant": "acme", "bastion_role": "tenant-admin"}
    page = open_page(context)
    page.goto("/console/sign-in")
    page.click("#sign-in-sso")
    page.wait_for_url(re.compile(r".*/console$"))
    assert page.locator("h1").inner_text() == "Overview"
    host = provider.issuer.removeprefix("http://")
    assert page.locator(".who .principal").inner_text() == f"jwt:{host}:alice"
    page.goto("/console/tenants")
    assert page.locator("#tenants tbody tr").count() == 1
    assert provider.requests["token"] >= 1


def test_screenshots_of_the_main_pages(
    browser: Browser, context: BrowserContext, server: BastionServer
) -> None:
    # Usage to chart: a few requests of two tenants' keys.
    for name, count in (("acme", 6), ("globex", 3)):
        found = key(server, name)
        with httpx.Client(
            base_url=server.url, headers={"authorization": f"Bearer {found['key']}"}, timeout=60
        ) as api:
            for n in range(count):
                body = {"model": "echo", "messages": [{"role": "user", "content": f"hi {n}"}]}
                assert api.post("/v1/chat/completions", json=body).status_code == 200
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    fresh = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 720})
    try:
        page = open_page(fresh)
        page.goto("/console/sign-in")
        page.screenshot(path=SCREENSHOTS / "sign-in.png")
    finally:
        fresh.close()
    page = sign_in(context, server.admin_key)
    page.goto("/console/audit")
    page.click("form[action='/console/audit/verify'] button")
    page.wait_for_load_state()
    assert flash(page).startswith("The audit log verifies:")
    assert page.locator("#verify-status .pill").inner_text() == "verified"
    page.goto("/console/models")
    served = page.locator("tr[data-model=scale]").inner_text()
    assert "ready" in served and "signed by" in served and "checked when loaded" in served
    broken = page.locator("tr[data-model=broken]").inner_text()
    assert "integrity_failed" in broken and "integrity check FAILED" in broken
    assert "plain directory" in page.locator("tr[data-model=echo]").inner_text()
    for name, path in (
        ("overview", "/console"),
        ("tenants", "/console/tenants"),
        ("keys", "/console/keys"),
        ("models", "/console/models"),
        ("usage", "/console/usage"),
        ("security", "/console/security"),
        ("audit", "/console/audit"),
    ):
        answer = page.goto(path)
        assert answer is not None and answer.status == 200, path
        page.screenshot(path=SCREENSHOTS / f"{name}.png")
    page.goto("/console/usage")
    assert page.locator("#charts rect.bar").count() > 0


# ---------------------------------------------------------------- TLS and the admin listener


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    home = tmp_path_factory.mktemp("console-tls") / "home"
    run_cli(home, "init", "--no-demo-models", "--self-signed")
    found = BastionServer(
        home,
        "--no-demo-models",
        "--self-signed",
        tls_ca=home / "tls" / "cert.pem",
        admin_listen=True,
    )
    try:
        found.wait_ready(timeout=120)
        yield found
    finally:
        found.stop()


def test_over_tls_the_console_is_on_the_admin_listener_with_host_cookies(
    split: BastionServer,
) -> None:
    with httpx.Client(base_url=split.url, verify=split.verify()) as public:
        refused = public.get("/console/sign-in")
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "route_not_found"
    with httpx.Client(base_url=split.admin_url, verify=split.verify(admin=True)) as admin:
        page = admin.get("/console/sign-in")
        assert page.status_code == 200
        pre = page.headers["set-cookie"]
        assert pre.startswith("__Host-bastion_console_pre=")
        assert {"HttpOnly", "Path=/", "SameSite=strict", "Secure"} <= set(pre.split("; "))
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert token is not None
        signed_in = admin.post(
            "/console/sign-in",
            data={"csrf": token[1], "key": split.admin_key},
            headers={"origin": split.admin_url},
        )
        assert signed_in.status_code == 303, signed_in.text
        session = next(
            v
            for k, v in signed_in.headers.multi_items()
            if k == "set-cookie" and v.startswith("__Host-bastion_console=")
        )
        assert {"HttpOnly", "Path=/", "SameSite=strict", "Secure"} <= set(session.split("; "))
        overview = admin.get("/console")
        assert overview.status_code == 200 and "<h1>Overview</h1>" in overview.text
        assert overview.headers["strict-transport-security"] == "max-age=63072000"
