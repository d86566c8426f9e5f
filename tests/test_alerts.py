"""deploy/prometheus/alerts.yml: valid rules (promtool check rules), each alert fired by the
series of deploy/prometheus/alerts.test.yml that should fire it and by no other (promtool test
rules), and naming only metrics the service exports (docs/metrics.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_metrics_doc import documented

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
# Series names in PromQL: identifiers followed by `{`, `[`, `)` or space, not functions.
SERIES = re.compile(r"\b(listeners_[a-z_]+)\b")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool missing: run scripts/bootstrap")


def alerts() -> list[dict[str, str]]:
    """Each rule's name and expression (the file's own layout: `expr:` then `for:`/`labels:`;
    promtool checks that it is valid YAML and PromQL)."""
    found = re.findall(r"- alert: (\w+)\n\s+expr: (.*?)\n\s+(?:for|labels):", RULES.read_text(), re.S)
    return [{"alert": name, "expr": expr} for name, expr in found]


@needs_promtool
def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert promtool is not None
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(UNIT_TESTS)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_names_only_exported_metrics() -> None:
    exported = set(documented())
    tested = set(re.findall(r"alertname: (\w+)", UNIT_TESTS.read_text()))
    assert len(alerts()) == RULES.read_text().count("- alert:") >= 10
    for rule in alerts():
        assert rule["alert"] in tested, rule["alert"]
        for name in SERIES.findall(rule["expr"]):
            assert name in exported or name.removesuffix("_bucket") in exported, (rule["alert"], name)


def test_every_alert_has_its_runbook_section() -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    sections = set(re.findall(r"^### (\w+)$", runbook, re.M))
    for rule in alerts():
        assert rule["alert"] in sections, rule["alert"]
    anchors = set(re.findall(r"runbook: docs/operations.md#(\w+)", RULES.read_text()))
    assert anchors == {a["alert"].lower() for a in alerts()}
