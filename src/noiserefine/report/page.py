"""The report page: one self-contained HTML file (inline CSS, no script, no remote resource) whose
pictures are the PNG files beside it. A header (command, date, commit, split, size, time), a table
of contents with each item's verdict, then one section per item: title, the paper's claim, ours,
a table, figures with captions, and the verdict with its reason."""

from __future__ import annotations

from html import escape
from typing import Any, Sequence

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1180px; margin: 0 auto;
       padding: 24px; color: #1d2329; background: #fff; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 19px; margin: 0 0 8px; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 14px; }
header dt { color: #5a6570; } header dd { margin: 0; }
code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
nav ol { columns: 2; font-size: 14px; } nav li { margin: 2px 0; }
section { border-top: 2px solid #e3e7eb; padding: 18px 0 10px; }
.paper, .ours { margin: 6px 0; } .label { font-weight: 600; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border: 1px solid #d5dbe0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #e3e7eb; }
figcaption { font-size: 13px; color: #5a6570; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; font-weight: 600;
         color: #fff; }
.agrees { background: #1a7f37; } .differs { background: #c4432b; } .not-applicable { background: #7a838c; }
.verdict { margin-top: 8px; } .quick { background: #fff4d6; padding: 6px 10px; border-radius: 4px; }
"""


def _badge(verdict: str) -> str:
    return f'<span class="badge {verdict.replace(" ", "-")}">{escape(verdict)}</span>'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k, ''))}</td>" for k in rows[0]) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(item: dict[str, Any], name: str, k: int) -> str:
    label = f"{item['title'].split(':')[0]}, figure {k + 1}"
    caption = f"{label}. {item.get('captions', {}).get(name, '')}".rstrip()
    return (f'<figure><img src="{escape(name)}" alt="{escape(label)}">'
            f'<figcaption>{escape(caption)} <a href="{escape(name)}">{escape(name)}</a></figcaption></figure>')


def _section(item: dict[str, Any]) -> str:
    figures = "".join(_figure(item, name, k) for k, name in enumerate(item["figures"]))
    return (f'<section id="{escape(item["key"])}" class="item">'
            f"<h2>{escape(item['title'])}</h2>"
            f'<p class="paper"><span class="label">Paper:</span> {escape(item["paper"])}</p>'
            f'<p class="ours"><span class="label">Ours:</span> {escape(item["ours"])}</p>'
            f"{_table(item['table'])}{figures}"
            f'<p class="verdict">{_badge(item["verdict"])} {escape(item["why"])}</p>'
            f'<p class="seconds"><small>{item["seconds"]:.1f} s in this run'
            f"{_computed_note(item)}</small></p></section>")


def _computed_note(item: dict[str, Any]) -> str:
    if item["computed"]:
        return f"; computed {len(item['computed'])} cached result(s)"
    return "; every result read from the cache" if item["reused"] else ""


def _history(history: Sequence[dict[str, Any]]) -> str:
    """One line per run of the report folder: when, what, how long, how many results it computed."""
    return "<br>".join(f"{escape(r['date'])}: <code>{escape(r['command'])}</code>, {r['minutes']:.1f} min, "
                       f"{r['computed']} result(s) computed ({escape(r['commit'])})" for r in history)


def _header(meta: dict[str, Any]) -> str:
    fields = [("command", f"<code>{escape(meta['command'])}</code>"), ("date", escape(meta["date"])),
              ("git commit", escape(meta["commit"])), ("split", escape(meta["split"])),
              ("size", "quick (small n: verdicts are not meaningful)" if meta["quick"] else "full"),
              ("total time", f"{meta['seconds'] / 60:.1f} min in this run ({escape(meta['machine'])})"),
              ("runs of this folder", _history(meta.get("history", []))),
              ("verdicts", escape(", ".join(f"{v} {k}" for k, v in meta["verdicts"].items())))]
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
    quick = '<p class="quick">A quick run: every item at a small n, for tests and a look at the page.</p>' \
        if meta["quick"] else ""
    return (f"<header><h1>NoiseRefine: the papers' evidence, regenerated on shapes16</h1>"
            f"<p>Each item states the paper's claim and number, ours on the shipped models (n and one standard "
            f"error given), and a verdict with its reason.</p><dl>{rows}</dl>{quick}</header>")


def render(meta: dict[str, Any], items: Sequence[dict[str, Any]]) -> str:
    """The page of a report: `meta` as `report.run` records it, `items` as report.json holds them."""
    toc = "".join(f'<li><a href="#{escape(i["key"])}">{escape(i["title"])}</a> {_badge(i["verdict"])}</li>'
                  for i in items)
    body = "".join(_section(i) for i in items)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>noiserefine report</title><style>{CSS}</style></head><body>"
            f"{_header(meta)}<nav><h2>Contents</h2><ol>{toc}</ol></nav><main>{body}</main></body></html>\n")
