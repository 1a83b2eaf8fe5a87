"""One self-contained HTML page: what `flopsim report`, `flopsim plan --html`
and `flopsim validate --html` write for a browser.

Conventions:
- self-contained: plotly.js (its basic bundle, vendored in flopsim/_vendor) is
  inlined once in the page's head (its own `<script id="plotly-js">` block)
  and nothing is fetched, so the page opens from `file://` with no network;
  figures are plotly figures (flopsim.iplots)
  placed as `<div id="fig-NAME">`, interactive (hover, legend toggles, zoom);
- text is markdown, rendered by markdown-it-py (CommonMark plus tables; raw
  HTML in the text is escaped, never passed through), with GitHub-style
  heading anchors so that the same "Contents" links work in the page and in
  a README;
- tables of numbers (`Page.table`) show each cell rounded for reading with
  its exact value, as the CSV next to the page writes it, in the cell's
  `title` (shown on hover) and `data-value` attributes;
- the page is deterministic: the same inputs give the same bytes (figure ids
  come from their names, figures carry an explicit template), so a committed
  page can be compared with a fresh run; it is written atomically
  (flopsim.outputs.write_atomic).

plotly is imported when a page is rendered, never by the core.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": False,
                 "toImageButtonOptions": {"format": "svg", "scale": 1}}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1em 2em 4em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h2 { font-size: 1.35em; border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
.scroll { overflow-x: auto; max-width: 100%; }
pre { background: #f6f8fa; padding: .7em 1em; overflow-x: auto; }
code { background: #f6f8fa; padding: 0 .2em; }
blockquote { color: #555; border-left: 4px solid #ddd; margin: .5em 0; padding: 0 1em; }
.figure { margin: .8em 0 1.5em; }
.figure .caption { color: #444; font-size: .9em; max-width: 70em; }
.meta { color: #666; font-size: .85em; }
""".strip()


def github_anchor(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", text.lower()).replace(" ", "-")


@dataclass
class Cell:
    """A table cell: what is shown, and (for numbers) the exact value as the CSV writes it."""

    shown: str
    exact: Optional[str] = None


def number_cell(value: Any) -> Cell:
    """A cell for a CSV value: floats shown to 4 significant digits, exact in the title."""
    if isinstance(value, bool) or value is None:
        return Cell("" if value is None else str(value))
    if isinstance(value, float):
        return Cell(f"{value:.4g}", repr(value))
    if isinstance(value, int):
        return Cell(f"{value:,}", str(value))
    return Cell(str(value))


@dataclass
class Page:
    """A page built block by block: markdown text, figures and tables, in order."""

    title: str
    blocks: list = field(default_factory=list)
    generator: str = ""
    _names: set = field(default_factory=set)

    def markdown(self, text: str) -> "Page":
        self.blocks.append(("markdown", text))
        return self

    def figure(self, fig, name: str, caption: str = "") -> "Page":
        """A plotly figure; `name` makes its element id (fig-NAME) and must be unique in the page."""
        div_id = "fig-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
        if div_id in self._names:
            raise ValueError(f"figure name {name!r} is used twice in the page")
        self._names.add(div_id)
        self.blocks.append(("figure", div_id, fig, caption))
        return self

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Cell]], caption: str = "",
              name: str = "") -> "Page":
        self.blocks.append(("table", list(columns), [list(r) for r in rows], caption, name))
        return self

    def render(self) -> str:
        body = [_render_block(b) for b in self.blocks]
        body = _add_heading_ids("\n".join(body))
        meta = f'<meta name="generator" content="{html.escape(self.generator)}">\n' if self.generator else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"{meta}<title>{html.escape(self.title)}</title>\n<style>\n{STYLE}\n</style>\n"
                f"<script id=\"plotly-js\" type=\"text/javascript\">{_plotly_js()}</script>\n"
                f"</head>\n<body>\n{body}\n</body>\n</html>\n")

    def write(self, path) -> Path:
        from flopsim.outputs import write_atomic

        path = Path(path)
        write_atomic(path, self.render())
        return path


PLOTLY_JS = Path(__file__).resolve().parent / "_vendor" / "plotly-basic.min.js"
PLOTLY_JS_VERSION = "4.1.1"  # flopsim/_vendor/README.md


def _plotly_js() -> str:
    """plotly.js's basic bundle (scatter and bar traces: all flopsim draws), vendored
    unmodified with its license (flopsim/_vendor/README.md): 1.2 MB where the full
    bundle plotly ships is 4.8 MB."""
    return PLOTLY_JS.read_text(encoding="utf-8")


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _render_block(block: tuple) -> str:
    kind = block[0]
    if kind == "markdown":
        return _markdown(block[1])
    if kind == "figure":
        _, div_id, fig, caption = block
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOTLY_CONFIG)
        cap = f'<div class="caption">{_markdown(caption)}</div>' if caption else ""
        return f'<div class="figure">\n{div}\n{cap}</div>'
    _, columns, rows, caption, name = block
    return _table_html(columns, rows, caption, name)


def _table_html(columns: list, rows: list, caption: str, name: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    lines = []
    for row in rows:
        cells = []
        for c in row:
            c = c if isinstance(c, Cell) else Cell(str(c))
            if c.exact is None:
                cells.append(f"<td>{html.escape(c.shown)}</td>")
            else:
                exact = html.escape(c.exact, quote=True)
                cells.append(f'<td class="num" title="{exact}" data-value="{exact}">{html.escape(c.shown)}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="table-{html.escape(name)}"' if name else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table{ident}>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(lines) + "\n</tbody></table></div>")


_HEADING = re.compile(r"<h([1-6])>(.*?)</h\1>", re.S)


def _add_heading_ids(body: str) -> str:
    """Give every heading GitHub's anchor as its id (duplicates numbered -1, -2, as GitHub does)."""
    seen: dict = {}

    def repl(m):
        text = html.unescape(re.sub(r"<[^>]+>", "", m.group(2)))
        anchor = github_anchor(text)
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        ident = anchor if n == 0 else f"{anchor}-{n}"
        return f'<h{m.group(1)} id="{html.escape(ident)}">{m.group(2)}</h{m.group(1)}>'

    return _HEADING.sub(repl, body)


def csv_table(page: Page, rows: Sequence[dict], caption: str = "", name: str = "",
              columns: Optional[Sequence[str]] = None, cell: Callable[[Any], Cell] = number_cell) -> Page:
    """Every row and column of a CSV (list of dicts) as a page table, exact values in the titles."""
    columns = list(columns or (rows[0].keys() if rows else []))
    return page.table(columns, [[cell(r.get(c)) for c in columns] for r in rows], caption=caption, name=name)
