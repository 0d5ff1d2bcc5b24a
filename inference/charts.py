"""Server-side charts for the cost dashboard: matplotlib draws each one as inline SVG, so the pages need no
JavaScript and nothing from the internet, and a test (or a screen reader) finds the chart in the HTML."""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot's import

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

# Text stays text (small SVG, selectable); a fixed hash salt makes the same data draw the same bytes.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ruvon", "font.size": 9})
PALETTE = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2")
_lock = threading.Lock()  # pyplot's state is global; ASGI may draw two charts at once


def line_chart(
    title: str,
    times: Sequence[datetime],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
    bucket: timedelta,
    percent: bool = False,
) -> str:
    """Return an SVG line chart (one line per series, gaps where a value is None) as an HTML-ready string."""
    with _lock:
        fig, ax = plt.subplots(figsize=(6.4, 2.6), dpi=100)
        try:
            for (label, values), color in zip(series.items(), PALETTE, strict=False):
                ys = [float("nan") if v is None else v * (100 if percent else 1) for v in values]
                ax.plot(
                    mdates.date2num(times),
                    ys,
                    marker="o",
                    markersize=3,
                    linewidth=1.5,
                    color=color,
                    label=label,
                )
            if times:  # fixed limits: one lone point would otherwise widen the axis to years of ticks
                ax.set_xlim(mdates.date2num(times[0] - bucket / 2), mdates.date2num(times[-1] + bucket / 2))
            unit = ylabel + (" (%)" if percent else "")
            _style(ax, title, unit, bucket, len(times), legend=len(series) > 1)
            if all(v is None or v >= 0 for values in series.values() for v in values):
                ax.set_ylim(bottom=0)  # a negative margin keeps its axis below zero
            fig.tight_layout()
            return _svg(fig, title)
        finally:
            plt.close(fig)


def _style(ax: plt.Axes, title: str, ylabel: str, bucket: timedelta, points: int, legend: bool) -> None:
    ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e5e7eb")
    ax.spines[["top", "right"]].set_visible(False)
    daily = bucket >= timedelta(days=1)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d" if daily else "%H:%M"))
    # At most ~8 ticks, on whole minutes, hours or days (AutoDateLocator warns on short ranges).
    every = max(1, points // 8)
    if bucket < timedelta(hours=1):
        locator: mdates.DateLocator = mdates.MinuteLocator(interval=every)
    else:
        locator = mdates.DayLocator(interval=every) if daily else mdates.HourLocator(interval=every)
    ax.xaxis.set_major_locator(locator)
    if legend:
        ax.legend(frameon=False, fontsize=8)


def _svg(fig: plt.Figure, title: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Title": title, "Date": None})
    svg = buffer.getvalue()
    # Drop the XML prolog and doctype: the SVG goes inline into an HTML page.
    svg = svg[svg.index("<svg") :]
    return svg.replace("<svg ", f'<svg role="img" aria-label="{title}" class="chart" ', 1)
