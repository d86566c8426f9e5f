"""Failures: for each fault, how long until it is noticed, until service recovers, events lost, duplicates.

The half-open scenarios are the tests of tests/test_half_open.py (a TCP proxy between one
consumer and Redis stops forwarding without closing); this runs them under pytest, `--runs`
times each, and reads the figures they record (`record_property`: noticed_s, recovered_s, lost,
duplicates) from pytest's JUnit XML. A scenario that fails says why instead of its figures.

    .venv/bin/python -m bench.failures --runs 3

The results replace the generated block of this benchmark in docs/benchmarks.md. Not covered
here: a Redis restart (tests/test_pipeline.py, tests/test_bridge.py, tests/test_cluster.py test
it, without timings yet) and kill -9 of an instance (timed by `python -m bench.cluster`).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.cluster import describe_code
from bench.latency import _measuring, machine, update_doc
from listeners_testkit.processes import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.failures:start -->", "<!-- bench.failures:end -->"
SECTION = "## Failures (`bench/failures.py`)"
TESTS = "tests/test_half_open.py"
# The consumer each test is about, in the order of the table, with the fault it suffers.
SCENARIOS = {
    "test_publisher": ("publisher", "half-open: every connection of the service frozen"),
    "test_hub": ("hub (WebSocket, Direct mode)", "half-open: every connection of the service frozen"),
    "test_control": ("control listener", "half-open: the service's pub/sub connections frozen"),
    "test_membership": (
        "membership (a 2nd instance joins)",
        "half-open: every connection of instance a frozen",
    ),
    "test_bridge": ("bridge", "half-open: the bridge's connections frozen"),
}
NOTICE_BOUND = 10.0  # issue 12


def log(text: str) -> None:
    print(f"[bench.failures] {text}", file=sys.stderr, flush=True)


@dataclass
class Scenario:
    test: str
    consumer: str
    fault: str
    noticed: list[float] = field(default_factory=list)
    recovered: list[float] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)
    duplicates: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_tests(runs: int, workdir: Path) -> list[ElementTree.Element]:
    """The half-open tests under pytest, `runs` times over (one pytest run each: pytest runs a
    test named twice on its command line once); their JUnit XML reports."""
    reports = []
    for run in range(runs):
        junit = workdir / f"junit-{run}.xml"
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
            f"--junitxml={junit}", *(f"{TESTS}::{test}" for test in SCENARIOS),
        ]  # fmt: skip
        log(" ".join(shlex.quote(part) for part in command))
        subprocess.run(command, cwd=PROJECT_ROOT, check=False)  # failures are read from the report
        reports.append(ElementTree.parse(junit).getroot())  # noqa: S314 - pytest's own report
    return reports


def collect(reports: list[ElementTree.Element]) -> list[Scenario]:
    scenarios = {test: Scenario(test, *about) for test, about in SCENARIOS.items()}
    for case in (case for report in reports for case in report.iter("testcase")):
        scenario = scenarios.get(case.get("name", "").split("[")[0])
        if scenario is None:
            continue
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            scenario.failures.append((problem.get("message") or "failed").splitlines()[0][:160])
            continue
        properties = {p.get("name"): float(p.get("value", "nan")) for p in case.iter("property")}
        scenario.noticed.append(properties["noticed_s"])
        scenario.recovered.append(properties["recovered_s"])
        scenario.lost.append(properties.get("lost", 0.0))
        scenario.duplicates.append(properties.get("duplicates", 0.0))
    return list(scenarios.values())


def _span(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f} to {high:.{digits}f}"


def render(scenarios: list[Scenario], runs: int, command: str, code: str, started: datetime) -> str:
    lines = [
        START,
        "",
        f"Command: `{command}`",
        "",
        f"Code: {code}. Run {started:%Y-%m-%d %H:%M} UTC on {machine()}.",
        "",
        f"Each scenario run {runs} time(s); a range is min to max. *Noticed*: seconds from the fault "
        "until the consumer was seen on the wire reconnecting (its channel subscribed again on a "
        "new connection; for the publisher, a command on a new connection). *Recovered*: seconds "
        "from the fault until what it serves worked again (a write reached the consumer, a "
        "request was answered, ownership converged). *Lost*: writes made during the fault that "
        "never reached the consumer. *Duplicates*: a write's delta delivered more than once. "
        f"The issue's bound for noticing is {NOTICE_BOUND:.0f} s.",
        "",
        "| consumer | fault | runs ok | noticed s | recovered s | lost | duplicates | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        failures = "; ".join(sorted(set(s.failures))).replace("|", "\\|") or "-"
        lines.append(
            f"| {s.consumer} | {s.fault} | {len(s.recovered)}/{len(s.recovered) + len(s.failures)} "
            f"| {_span(s.noticed)} | {_span(s.recovered)} | {_span(s.lost, 0)} "
            f"| {_span(s.duplicates, 0)} | {failures} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failures", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--runs", type=int, default=1, help="times each scenario is run")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the results only")
    parser.add_argument("--code", help="what code was measured (default: from git)")
    args = parser.parse_args(argv)
    started, began = datetime.now(UTC), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="listeners-bench-failures-") as workdir:
        scenarios = collect(run_tests(args.runs, Path(workdir)))
    log(f"done in {time.monotonic() - began:.0f} s")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.failures", shlex.join(_measuring(given))]).strip()
    block = render(scenarios, args.runs, command, args.code or describe_code(), started)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)


if __name__ == "__main__":
    main()
