#!/usr/bin/env python3
"""Render deploy/task-definition.jsonc into the JSON that ECS RegisterTaskDefinition takes.

    python3 deploy/render.py --outputs stack-outputs.json > task-definition.json

`stack-outputs.json` is the infra stack's outputs as `aws cloudformation describe-stacks --query
'Stacks[0].Outputs'` prints them (a list of {OutputKey, OutputValue}), or a plain {name: value}
object. In the template's string values `${Name}` becomes the output of that name (missing: an
error naming every missing output) and `${Name?}` becomes it or "" (an environment variable
left empty is then dropped). Lines starting with `//` are comments. Standard library only, so
that it runs as is on the GitHub runner.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("task-definition.jsonc")
_PLACEHOLDER = re.compile(r"\$\{(\w+)(\?)?\}")


def load_template(path: Path = TEMPLATE) -> Any:
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")]
    return json.loads("\n".join(lines))


def outputs_mapping(raw: Any) -> dict[str, str]:
    if isinstance(raw, list):
        return {str(o["OutputKey"]): str(o["OutputValue"]) for o in raw}
    return {str(k): str(v) for k, v in raw.items()}


def render(template: Any, outputs: dict[str, str]) -> Any:
    missing: set[str] = set()

    def fill(value: Any) -> Any:
        if isinstance(value, str):

            def one(match: re.Match[str]) -> str:
                name, optional = match.group(1), match.group(2)
                if name not in outputs and not optional:
                    missing.add(name)
                return outputs.get(name, "")

            return _PLACEHOLDER.sub(one, value)
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    rendered = fill(template)
    if missing:
        raise KeyError(f"infra stack outputs missing: {', '.join(sorted(missing))}")
    for container in rendered.get("containerDefinitions", []):
        container["environment"] = [e for e in container.get("environment", []) if e.get("value") != ""]
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", required=True, type=Path, help="the infra stack's outputs (JSON)")
    parser.add_argument("--template", default=TEMPLATE, type=Path)
    args = parser.parse_args(argv)
    try:
        rendered = render(load_template(args.template), outputs_mapping(json.loads(args.outputs.read_text())))
    except KeyError as exc:
        print(f"render: {exc.args[0]}", file=sys.stderr)
        return 2
    json.dump(rendered, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
