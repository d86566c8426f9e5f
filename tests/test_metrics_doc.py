"""docs/metrics.md's table is what /metrics exports, both ways: every metric of a scrape is
documented with its type and labels, and every documented metric is exported."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from listeners.metrics import Metrics

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(listeners_\w+)` \| (\w+) \| ([^|]*) \| (\w+) \| (.+) \|$")


def documented() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """name -> (type, labels, how the workers combine), from the table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if m := ROW.match(line):
            labels = tuple(re.findall(r"`(\w+)`", m.group(3)))
            assert m.group(1) not in rows, f"{m.group(1)} twice"
            rows[m.group(1)] = (m.group(2), labels, m.group(4))
    return rows


def exposed_name(name: str, kind: str) -> str:
    return name + "_total" if kind == "counter" else name


def test_every_exported_metric_is_documented_and_every_documented_one_exported() -> None:
    metrics = Metrics()
    scraped = {
        exposed_name(f.name, f.type): f.type
        for f in text_string_to_metric_families(metrics.render().decode())
    }
    doc = documented()
    assert len(doc) > 30
    assert sorted(set(scraped) - set(doc)) == [], "exported, not in docs/metrics.md"
    assert sorted(set(doc) - set(scraped)) == [], "in docs/metrics.md, not exported"
    for name, kind in scraped.items():
        assert doc[name][0] == kind, name
    # Labels and the multiprocess mode are the metric objects' own (a fresh scrape has no
    # labelled samples yet).
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind, labels, workers = doc[exposed_name(value._name, str(value._type))]
            assert labels == tuple(value._labelnames), value._name
            mode = value._multiprocess_mode if kind == "gauge" else "sum"  # type: ignore[attr-defined]
            assert workers == mode, value._name


def test_no_label_can_hold_a_user_or_a_thread() -> None:
    for _, labels, _ in documented().values():
        assert not {"uid", "user", "thread", "doc_id", "channel"} & set(labels)
