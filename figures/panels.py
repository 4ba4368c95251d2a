"""Side-by-side panels from single-run knowtrace figures (GA | FTTP, ...), for the paper's layouts."""

from __future__ import annotations

from plotly.subplots import make_subplots


def side_by_side(figs: dict, title: str, rows_per_fig: int = 1, shared_yaxes: bool = True, **layout):
    """One column per figure; each source figure's subplot rows stay rows (traces copied with their
    row). Legends of later columns are hidden (same series)."""
    names = list(figs)
    fig = make_subplots(rows=rows_per_fig, cols=len(names), shared_yaxes=shared_yaxes, horizontal_spacing=0.06,
                        subplot_titles=[n if r == 0 else "" for r in range(rows_per_fig) for n in names])
    for col, name in enumerate(names, start=1):
        src = figs[name]
        for trace in src.data:
            axis = getattr(trace, "yaxis", None) or "y"
            row = int(axis[1:] or 1) if rows_per_fig > 1 else 1
            trace = trace.update(showlegend=(col == 1) and trace.showlegend is not False)
            fig.add_trace(trace, row=row, col=col)
    fig.update_layout(title=title, **layout)
    return fig
