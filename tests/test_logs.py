"""Log lines never carry a secret, nor a token that came in a URL (pure unit)."""

from __future__ import annotations

import json
import logging

from listeners import logs


def line(message: str, **extra: object) -> str:
    record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "t", **extra})
    return logs.JsonFormatter().format(record)


def test_tokens_in_urls_are_masked() -> None:
    text = line('127.0.0.1:5 - "WebSocket /ws?token=eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl&v=1" [accepted]')
    assert "eyJ" not in text and "token=***&v=1" in json.loads(text)["message"]


def test_registered_secrets_are_masked_everywhere() -> None:
    logs.register_secret("a-password-to-hide\nsecond-line-of-key")
    text = line("connect failed: a-password-to-hide", reason="second-line-of-key")
    assert "a-password-to-hide" not in text and "second-line-of-key" not in text
