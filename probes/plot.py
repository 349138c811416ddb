"""Plotly figures for probe results.

Every result type's ``.plot()`` lands here, so figures share one look. Figures are plain
``plotly.graph_objects.Figure`` objects: they render in Jupyter, and :mod:`probes.report` embeds them
in a self-contained HTML page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from probes.curves import PathResult

__all__ = ["COLORS", "path_figure"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def path_figure(
    results: Sequence[tuple[str, PathResult]],
    *,
    title: str | None = None,
    chord: bool = True,
) -> go.Figure:
    """Loss (left) and error rate (right) along one or more paths, each with its endpoint chord.

    Args:
        results: ``(name, PathResult)`` pairs drawn in one figure (e.g. naive vs aligned, or train
            vs test).
        title: figure title.
        chord: draw the dashed chord between the endpoint values that Eq. (1) measures against.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "error rate"), horizontal_spacing=0.1)
    for i, (name, res) in enumerate(results):
        color = COLORS[i % len(COLORS)]
        ts = np.asarray(res.ts, dtype=float)
        for col, values in ((1, np.asarray(res.loss, float)), (2, 1.0 - np.asarray(res.accuracy, float))):
            hover = "t=%{x:.3f}<br>%{y:.4f}<extra>" + name + "</extra>"
            fig.add_trace(
                go.Scatter(
                    x=ts, y=values, mode="lines+markers", name=name, legendgroup=name,
                    showlegend=col == 1, line={"color": color}, marker={"size": 5}, hovertemplate=hover,
                ),
                row=1, col=col,
            )
            if chord and ts.size >= 2:
                fig.add_trace(
                    go.Scatter(
                        x=[ts[0], ts[-1]], y=[values[0], values[-1]], mode="lines", name=f"{name} chord",
                        legendgroup=name, showlegend=False, hoverinfo="skip",
                        line={"color": color, "dash": "dash", "width": 1},
                    ),
                    row=1, col=col,
                )
            bad = ~np.isfinite(values)
            if bad.any():  # non-finite points: marked where the curve breaks, not skipped silently
                good = values[~bad]
                level = float(np.max(good)) if good.size else 0.0
                fig.add_trace(
                    go.Scatter(
                        x=ts[bad], y=np.full(int(bad.sum()), level), mode="markers", name=f"{name} non-finite",
                        legendgroup=name, showlegend=False, marker={"symbol": "x", "size": 10, "color": "red"},
                        hovertemplate="t=%{x:.3f}<br>non-finite<extra>" + name + "</extra>",
                    ),
                    row=1, col=col,
                )
        try:
            b = res.barrier
        except ValueError:
            continue
        text = f"{name}: loss barrier {b.loss:.4g} (t={b.t_loss:.2f}), error barrier {b.error:.4g}"
        if not b.finite:
            text = f"{name}: NON-FINITE values on the path (marked x): loss barrier {b.loss:.4g}, error barrier {b.error:.4g}"
        fig.add_annotation(
            text=text,
            xref="paper", yref="paper", x=0.0, y=-0.18 - 0.07 * i, showarrow=False, xanchor="left",
            font={"color": color, "size": 12},
        )
    fig.update_xaxes(title_text="t")
    fig.update_layout(
        title=title, template="plotly_white", height=420 + 30 * len(results),
        margin={"b": 90 + 25 * len(results)}, legend={"orientation": "h", "y": 1.15},
    )
    return fig


def figure_html(fig: Any, *, include_plotlyjs: bool | str = False, div_id: str | None = None) -> str:
    """A figure as an HTML ``<div>`` (plotly.js not included unless asked: the page embeds it once)."""
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, div_id=div_id)
