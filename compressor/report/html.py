"""report.html: one self-contained file, its figures embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html

from compressor.report.markdown import baseline_header, baseline_rows, headline, summary_rows
from compressor.report.schema import Report

STYLE = ("body{font-family:system-ui,sans-serif;max-width:%s;margin:2em auto;color:#222}"
         "table{border-collapse:collapse%s}td,th{border:1px solid #ccc;padding:4px 10px}td+td{text-align:right}"
         "figure{margin:1.5em 0}img{max-width:100%%}")


def to_html(report: Report, figures: dict[str, bytes]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(m)}</td><td>{esc(a)}</td><td>{esc(b)}</td></tr>"
                   for m, a, b in summary_rows(report))
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compressor report</title>
<style>{STYLE % ("960px", "")}</style></head><body>
<h1>compressor report: {esc(report.model)}</h1>
<p><strong>{esc(headline(report))}</strong></p>
<table><tr><th>metric</th><th>original</th><th>compressed</th></tr>{rows}</table>
{_baselines(report)}
{f'<ul>{notes}</ul>' if notes else ''}
{figures_html(figures)}
</body></html>
"""


def _baselines(report: Report) -> str:
    if not report.baselines:
        return ""
    return ("<h2>Against quantizing alone and removing blocks alone</h2>"
            + table_html(baseline_header(report), baseline_rows(report)))


def figures_html(figures: dict[str, bytes]) -> str:
    """Figures as <figure> elements with the PNG embedded as a data URI (one self-contained file)."""
    esc = html.escape
    return "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(title)}</figcaption></figure>" for title, png in figures.items())


def table_html(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str, width: str = "1200px") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE % (width, ";margin:1em 0")}</style></head><body>
{body}
</body></html>
"""
