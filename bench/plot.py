"""PNG figures for the benchmark reports: one row of panels, one line per series.

    from bench.plot import Panel, save_panels
    save_panels(Path("docs/scale.png"), "Scale", "online users", [
        Panel("threads", {"listen": [(1000, 8), (10000, 8)], "sdk": [(1000, 2020)]}, log_y=True),
    ])

matplotlib runs headless (Agg) and only here, so the service never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Series = Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Panel:
    y_label: str
    series: Mapping[str, Series]
    log_y: bool = False
    log_x: bool = False
    goal: float | None = None  # drawn as a dashed line


def save_panels(
    path: Path, title: str, x_label: str, panels: Sequence[Panel], columns: int | None = None
) -> Path:
    """One row of panels, or rows of `columns`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across = min(columns or len(panels), len(panels))
    down = -(-len(panels) // across)
    figure, axes = plt.subplots(down, across, figsize=(4.2 * across, 3.6 * down), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        if panel.goal is not None:
            axis.axhline(panel.goal, color="grey", linestyle="--", linewidth=1, label=f"goal {panel.goal:g}")
        for name, points in panel.series.items():
            ordered = sorted(points)
            if ordered:
                axis.plot([x for x, _ in ordered], [y for _, y in ordered], marker="o", label=name)
        axis.set_xlabel(x_label)
        axis.set_ylabel(panel.y_label)
        if panel.log_y:
            axis.set_yscale("log")
        if panel.log_x:
            axis.set_xscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the metadata, so an unchanged figure is an unchanged file.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path
