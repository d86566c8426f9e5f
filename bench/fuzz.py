"""The long fuzz run, outside CI: tests/test_fuzz_inputs.py with N cases per entry point.

    .venv/bin/python -m bench.fuzz --examples 10000

Each case feeds one arbitrary value, byte string or text to one entry point of the real
service, then checks that an ordinary write still reaches Redis and an open WebSocket. The
counts (cases per entry point, and how many the upstream refused before they reached us, e.g.
Firestore refusing an empty field name) go to docs/security.md, with the command and the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from listeners_testkit.processes import PROJECT_ROOT, FirestoreEmulator, emulator_kind

DOC = PROJECT_ROOT / "docs" / "security.md"
START, END = "<!-- bench.fuzz:start -->", "<!-- bench.fuzz:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=10_000, help="cases per entry point")
    parser.add_argument("-k", default="", help="only these entry points (pytest -k)")
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp(prefix="listeners-fuzz-")) / "counts.json"
    env = {**os.environ, "LISTENERS_FUZZ_EXAMPLES": str(args.examples), "LISTENERS_FUZZ_REPORT": str(report)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
    command += ["-o", "timeout=0", "tests/test_fuzz_inputs.py"] + (["-k", args.k] if args.k else [])
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=False, capture_output=True, text=True)
    minutes = (time.monotonic() - started) / 60
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    counts = json.loads(report.read_text()) if report.exists() else {}
    full = report.with_name("pytest-output.txt")  # the failing example, if any, is in here
    full.write_text(result.stdout + result.stderr)
    print(result.stdout[-3000:], result.stderr[-2000:], f"full output: {full}", sep="\n")
    write(args, counts, summary, minutes, result.returncode)
    return result.returncode


def write(args: argparse.Namespace, counts: dict[str, int], summary: str, minutes: float, code: int) -> None:
    lines = [
        START,
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {minutes:.0f} min, "
        f"{FirestoreEmulator.describe(emulator_kind())}:",
        "",
        "```sh",
        f".venv/bin/python -m bench.fuzz --examples {args.examples}" + (f" -k '{args.k}'" if args.k else ""),
        "```",
        "",
        f"Result: {'passed' if code == 0 else 'FAILED'} (`{summary}`).",
        "",
        "| entry point | cases | of which refused upstream |",
        "|---|---:|---:|",
    ]
    for name in sorted(k for k in counts if ":" not in k and k != "examples_per_entry_point"):
        refused = sum(v for k, v in counts.items() if k.startswith(f"{name}: refused"))
        lines.append(f"| {name} | {counts[name]:,} | {refused:,} |")
    lines += ["", END]
    text = DOC.read_text() if DOC.exists() else "# Security\n"
    if START in text and END in text:
        text = text[: text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END) :]
    else:
        text += "\n## Fuzz run (`bench/fuzz.py`)\n\n" + "\n".join(lines) + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
