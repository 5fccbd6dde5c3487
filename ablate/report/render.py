"""One report, two renderings: Markdown that links its figure files, and one HTML page with
everything embedded (figures as base64 PNG, styles inline), which opens offline.

Text is written with Markdown's inline code and bold only (`name`, **this**); the HTML side
escapes it.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from tabulate import tabulate

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
.left-out { color: #8a6d3b; background: #fcf8e3; padding: .4em .8em; border-left: 3px solid #e0c36b; }
"""


@dataclass
class Document:
    title: str
    parts: list = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.parts.append(("para", text))

    def left_out(self, text: str) -> None:
        self.parts.append(("left_out", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.parts.append(("bullets", items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.parts.append(("table", headers, rows))

    def figure(self, name: str, caption: str) -> None:
        """``name``.png (and .svg) in the report folder."""
        self.parts.append(("figure", name, caption))

    # ----- renderings ---------------------------------------------------------------
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *a in self.parts:
            if kind == "heading":
                out += ["#" * a[0] + " " + a[1], ""]
            elif kind == "para":
                out += [a[0], ""]
            elif kind == "left_out":
                out += [f"> {a[0]}", ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in a[0]] + [""]
            elif kind == "table":
                out += [tabulate(a[1], headers=a[0], tablefmt="github", disable_numparse=True), ""]
            elif kind == "figure":
                out += [f"![{a[0].replace('_', ' ')}]({a[0]}.png)", "", f"*{a[1]}* ([SVG]({a[0]}.svg))", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self, images: dict[str, bytes]) -> str:
        """The page, each figure embedded from ``images`` (figure name -> PNG bytes)."""
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, *a in self.parts:
            if kind == "heading":
                body.append(f"<h{a[0]}>{_inline(a[1])}</h{a[0]}>")
            elif kind == "para":
                body.append(f"<p>{_inline(a[0])}</p>")
            elif kind == "left_out":
                body.append(f'<p class="left-out">{_inline(a[0])}</p>')
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in a[0]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in a[0])
                rows = "".join("<tr>" + "".join(_td(str(c)) for c in row) + "</tr>" for row in a[1])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "figure":
                data = base64.b64encode(images[a[0]]).decode("ascii")
                body.append(f'<figure id="{a[0]}"><img src="data:image/png;base64,{data}" alt="{html.escape(a[1])}">'
                            f"<figcaption>{_inline(a[1])}</figcaption></figure>")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


def _td(text: str) -> str:
    """A table cell; numbers (``12.3 ± 0.4``, ``+0.4%``, ``–``) align right."""
    numeric = re.fullmatch(r"[-+–]?[0-9.]*[0-9](e[-+]?[0-9]+)?%?( ± [0-9.e-]+)?( \(n=[0-9]+\))?|–", text)
    return f'<td class="num">{_inline(text)}</td>' if numeric else f"<td>{_inline(text)}</td>"


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` and **bold** spans as <code> and <strong>."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
