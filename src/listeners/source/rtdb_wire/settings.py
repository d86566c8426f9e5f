"""The wire client the configuration asks for: what `service.rtdb_client` does for REST."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

from listeners.config import Settings
from listeners.source.rtdb import ServiceAccountTokens
from listeners.source.rtdb_wire.client import WireClient


async def _emulator_token(*, refresh: bool = False) -> str:
    return "owner"  # what the Firebase emulators take as an administrator's token


def _namespace(url: str, project_id: str) -> str:
    """As `service.rtdb_namespace`: `?ns=NAME`, else the host's first label, else the default."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "ns" in query:
        return query["ns"]
    if parts.hostname:
        return parts.hostname.split(".")[0]
    return f"{project_id}-default-rtdb"


def wire_client(settings: Settings) -> WireClient | None:
    """The wire client for `LISTENERS_RTDB_TRANSPORT=wire`, or None when no database is
    configured: the emulator (or stand-in) host with the emulators' `owner` token, or the
    database URL with the service account's access tokens."""
    firebase = settings.firebase
    if firebase.database_emulator_host:
        namespace = _namespace(firebase.database_url, firebase.project_id)
        return WireClient(
            f"http://{firebase.database_emulator_host}", namespace=namespace, tokens=_emulator_token
        )
    if firebase.database_url and firebase.admin_json is not None:
        tokens = ServiceAccountTokens.from_service_account_info(json.loads(firebase.admin_json.reveal()))
        return WireClient(firebase.database_url, tokens=tokens)
    return None
