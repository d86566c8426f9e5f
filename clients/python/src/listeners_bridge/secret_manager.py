"""Google Secret Manager access (specification §3): its set-up, and the reader of secrets.

Secret Manager ids allow only letters, digits, `-` and `_`, while the specification names
secrets like `pinnokio/listeners/redis`; a name is mapped to its id by replacing every
`/` with `-` (`pinnokio-listeners-redis`). A full resource name
(`projects/.../secrets/.../versions/...`) is used as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SecretReader = Callable[[str], str | None]  # a secret's text by name; None when it does not exist

_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


class Unreachable(Exception):
    """Secret Manager cannot be set up; the message names the cause, never a secret's value."""


def secret_id(name: str) -> str:
    return name.replace("/", "-")


def secret_path(project: str, name: str) -> str:
    if name.startswith("projects/"):
        return name
    return f"projects/{project}/secrets/{secret_id(name)}/versions/latest"


def connect(project: str, service_account_secret: str = "", credentials_json: str = "") -> SecretReader:
    """The one set-up of Secret Manager, for every loader: `secret_reader`, or `Unreachable`."""
    try:
        return secret_reader(project, service_account_secret, credentials_json)
    except Exception as exc:
        raise Unreachable(f"Google Secret Manager: cannot connect ({type(exc).__name__}: {exc})") from None


def secret_reader(project: str, service_account_secret: str = "", credentials_json: str = "") -> SecretReader:
    """A reader on the default credentials chain, or on `credentials_json` (a service account
    JSON, GOOGLE_APPLICATION_CREDENTIALS_JSON: what ECS injects from its task `secrets`) when
    given; with GOOGLE_SERVICE_ACCOUNT_SECRET set, that secret's service account JSON is read
    first and used for every other secret."""
    from google.api_core.exceptions import NotFound
    from google.cloud import secretmanager
    from google.oauth2 import service_account

    initial = None
    if credentials_json:
        initial = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            json.loads(credentials_json), scopes=_SCOPES
        )
    client: Any = secretmanager.SecretManagerServiceClient(credentials=initial)

    def read(name: str) -> str | None:
        try:
            response = client.access_secret_version(name=secret_path(project, name), timeout=10)
        except NotFound:
            return None
        return str(response.payload.data.decode("utf-8"))

    if service_account_secret:
        raw = read(service_account_secret)
        if raw is None:
            raise LookupError(f"secret {service_account_secret} (GOOGLE_SERVICE_ACCOUNT_SECRET) not found")
        credentials = service_account.Credentials.from_service_account_info(json.loads(raw), scopes=_SCOPES)  # type: ignore[no-untyped-call]
        client = secretmanager.SecretManagerServiceClient(credentials=credentials)
    return read
