"""JSON Schemas of every event, generated from the TypedDicts in `listeners_bridge.events`.

`python -m listeners.schemas [DIR]` writes one file per event type (default docs/schemas);
a test checks that the committed files are current and that real events validate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from listeners_bridge.events import CONTRACT_VERSION, EVENT_MODELS

# The schemas' own statement of the contract version they describe (an annotation: validators
# ignore unknown keywords); each also pins the envelope's `v` to it.
VERSION_KEYWORD = "x-contract-version"


def schema(event_type: str) -> dict[str, Any]:
    generated = TypeAdapter(EVENT_MODELS[event_type]).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": event_type,
        VERSION_KEYWORD: CONTRACT_VERSION,
        **generated,
    }


def render(event_type: str) -> str:
    return json.dumps(schema(event_type), indent=2, sort_keys=True) + "\n"


def validate(event: dict[str, Any]) -> None:
    """Raise if an event does not match the schema of its type."""
    TypeAdapter(EVENT_MODELS[event["type"]]).validate_python(event, strict=True)


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else Path("docs/schemas")
    target.mkdir(parents=True, exist_ok=True)
    for event_type in EVENT_MODELS:
        (target / f"{event_type}.json").write_text(render(event_type))


if __name__ == "__main__":
    main(sys.argv[1:])
