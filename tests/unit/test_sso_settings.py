"""Single sign-on settings: read from BASTION_* variables, checked together."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import Settings
from bastion.errors import ConfigurationError

ISSUER = "https://idp.example/realms/bastion"


def sso(**env: str) -> object:
    return Settings.load({f"BASTION_{k.upper()}": v for k, v in env.items()}).single_sign_on()


def test_off_unless_an_issuer_is_set() -> None:
    assert Settings.load({}).single_sign_on() is None


def test_bearer_tokens_and_the_console() -> None:
    settings = Settings.load(
        {
            "BASTION_JWT_ISSUER": ISSUER,
            "BASTION_JWT_AUDIENCE": "bastion-api",
            "BASTION_JWT_ALGORITHMS": "RS256, PS256",
            "BASTION_JWT_TENANT_CLAIM": "groups",
            "BASTION_JWT_TENANT_PATTERN": "bastion-tenant-(.+)",
            "BASTION_JWT_ROLE_CLAIM": "groups",
            "BASTION_JWT_ROLE_MAP": "ml-users=consumer, ml-admins = tenant-admin",
            "BASTION_OIDC_CLIENT_ID": "bastion-console",
            "BASTION_OIDC_CLIENT_SECRET": "s3cret",
            "BASTION_OIDC_REDIRECT_URL": "https://bastion.example/console/callback",
        }
    )
    found = settings.single_sign_on()
    assert found is not None
    assert (found.issuer, found.audience) == (ISSUER, "bastion-api")
    assert found.algorithms == ("RS256", "PS256")
    assert (found.tenant_claim, found.tenant_pattern) == ("groups", "bastion-tenant-(.+)")
    assert found.role_map == {"ml-users": "consumer", "ml-admins": "tenant-admin"}
    assert (found.client_id, found.client_secret) == ("bastion-console", "s3cret")
    assert "s3cret" not in repr(found) and "s3cret" not in repr(settings)
    assert found.leeway_s == 30.0 and found.jwks_ttl_s == 300.0


def test_the_client_secret_may_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-a-file\n")
    found = Settings.load(
        {
            "BASTION_JWT_ISSUER": ISSUER,
            "BASTION_OIDC_CLIENT_ID": "console",
            "BASTION_OIDC_CLIENT_SECRET_FILE": str(path),
            "BASTION_OIDC_REDIRECT_URL": "https://bastion.example/cb",
        }
    ).single_sign_on()
    assert found is not None
    assert found.client_secret == "from-a-file"
    assert found.audience is None  # the console only: no bearer tokens on the API


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"jwt_audience": "api"}, "needs the issuer"),
        ({"jwt_issuer": ISSUER}, "JWT_AUDIENCE"),
        ({"jwt_issuer": ISSUER, "jwt_audience": "a", "jwt_algorithms": "RS256,HS256"}, "HMAC"),
        ({"jwt_issuer": ISSUER, "jwt_audience": "a", "jwt_algorithms": "none"}, "HMAC"),
        ({"jwt_issuer": ISSUER, "jwt_audience": "a", "jwt_role_map": "ops"}, "value=role"),
        (
            {"jwt_issuer": ISSUER, "jwt_audience": "c", "oidc_client_id": "c"},
            "must differ",
        ),
        ({"jwt_issuer": ISSUER, "oidc_client_id": "c"}, "REDIRECT_URL"),
        (
            {
                "jwt_issuer": ISSUER,
                "oidc_client_id": "c",
                "oidc_redirect_url": "https://b.example/cb",
                "oidc_client_secret": "s",
                "oidc_client_secret_file": "/nonexistent",
            },
            "not both",
        ),
        (
            {
                "jwt_issuer": ISSUER,
                "oidc_client_id": "c",
                "oidc_redirect_url": "https://b.example/cb",
                "oidc_client_secret_file": "/nonexistent/secret",
            },
            "cannot be read",
        ),
    ],
)
def test_settings_that_do_not_fit_together_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        sso(**env)
