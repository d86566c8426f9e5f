"""deploy/grafana/listeners.json: the rows the operators asked for, and every panel's PromQL
parses (promtool check rules, on a rules file made of the expressions) and names only metrics
the service exports (docs/metrics.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_metrics_doc import documented

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "listeners.json"
SERIES = re.compile(r"\b(listeners_[a-z_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum")


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    # Grafana's own interval, as a Prometheus server would get it once Grafana has filled it in.
    return [t["expr"].replace("$__rate_interval", "5m") for p in panels() for t in p["targets"]]


def test_the_rows_are_traffic_latency_health_websocket_cluster() -> None:
    rows = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Health", "WebSocket", "Cluster"]
    assert len({p["id"] for p in panels()}) == len(panels())


def test_every_expression_names_only_exported_metrics() -> None:
    exported = set(documented())
    for expr in expressions():
        names = SERIES.findall(expr)
        assert names, expr
        for name in names:
            base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
            assert name in exported or base in exported, (name, expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: run scripts/bootstrap")
def test_every_expression_parses(tmp_path: Path) -> None:
    recorded = [{"record": f"dashboard:panel_{n}", "expr": expr} for n, expr in enumerate(expressions())]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(expressions())} rules found" in done.stdout
