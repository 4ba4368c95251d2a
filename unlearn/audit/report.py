"""``RUN/audit/audit.html``: the verdicts (per attack and overall, with their rules and numbers) above the
audit dataset's views (:func:`knowtrace.audit_plots.audit_figure`); one self-contained file (plotly.js
inlined, it opens offline), like the demo's report."""

from __future__ import annotations

import html
import json
from pathlib import Path


def write_audit_report(ds, report: dict, out: Path) -> Path:
    from knowtrace.audit_plots import audit_figure

    esc = html.escape
    rows = [("overall", report["overall"])] + list(report["attacks"].items())
    table = "".join(f"<tr><th>{esc(name)}</th><td class='{esc(v['verdict'])}'>{esc(v['verdict'])}</td>"
                    f"<td>{esc(v['rule'])}</td><td><pre>{esc(json.dumps(v['numbers'], indent=1))}</pre></td></tr>"
                    for name, v in rows)
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Forgetting audit of {esc(report['run'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}pre{margin:0}"
             ".hidden{background:#fdd}.removed{background:#dfd}.inconclusive{background:#eee}</style></head><body>",
             f"<h1>Forgetting audit: {esc(report['concept'])} ({esc(report['method'])})</h1>",
             f"<p>Run {esc(report['run'])}; models compared: {esc(', '.join(report['models']))}; seed "
             f"{report['seed']}. <b>removed</b>: the unlearned model behaves like one that never saw the concept; "
             f"<b>hidden</b>: an attack brings it back; <b>inconclusive</b>: the attack could not tell.</p>",
             f"<table><tr><th>attack</th><th>verdict</th><th>rule</th><th>numbers</th></tr>{table}</table>"]
    if ds.data_vars:
        parts += ["<h2>Measurements</h2>", audit_figure(ds).to_html(full_html=False, include_plotlyjs=True)]
    parts.append("</body></html>")
    out = Path(out)
    out.write_text("\n".join(parts))
    return out
