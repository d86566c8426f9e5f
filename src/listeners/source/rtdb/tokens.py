"""The REST API's access tokens: the shared `ServiceAccountTokens` with the database's scopes."""

from __future__ import annotations

from listeners.source import access_tokens
from listeners.source.access_tokens import TokenProvider

# The scopes the REST API asks of a Google OAuth2 access token (docs: database/rest/auth).
SCOPES = (
    "https://www.googleapis.com/auth/firebase.database",
    "https://www.googleapis.com/auth/userinfo.email",
)


class ServiceAccountTokens(access_tokens.ServiceAccountTokens):
    """`access_tokens.ServiceAccountTokens` asking the REST API's `SCOPES` unless told others."""

    default_scopes = SCOPES


__all__ = ["SCOPES", "ServiceAccountTokens", "TokenProvider"]
