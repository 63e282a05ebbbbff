"""Markdown of prompts and completions as safe HTML for the labeling pages.

    render("Use `git rebase -i`:\n\n```bash\ngit rebase -i HEAD~3\n```")   # -> Markup

A small subset on purpose: paragraphs, headings, bullet and numbered lists, fenced code blocks,
inline code, **bold** and *emphasis*. Every character of the text is HTML-escaped first, and the
only markup added is the fixed tags above, without attributes, so no input can make a script,
an event handler, an image or a link: a Markdown link shows its text and its address as text.
Bidirectional control characters (which can make text read in another order than it is stored,
e.g. U+202E) are shown as visible markers. A single plain paragraph comes out as its escaped
text alone.
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape

FENCE = re.compile(r"^\s*(```|~~~)\s*[\w+#.-]*\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
NUMBERED = re.compile(r"^\s*\d{1,9}[.)]\s+(.*)$")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
EMPHASIS = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _text(text: str) -> str:
    """Escaped text with the bidirectional controls made visible."""
    return BIDI.sub(lambda m: f'<span class="bidi">[U+{ord(m.group()):04X}]</span>', str(escape(text)))


def _inline(text: str) -> str:
    out = []
    for n, piece in enumerate(CODE_SPAN.split(text)):  # odd pieces are inside backticks
        if n % 2:
            out.append(f"<code>{_text(piece)}</code>")
            continue
        html = _text(piece)  # escaped, so the patterns below see no markup of the author's
        html = LINK.sub(r'\1 <span class="url">(\2)</span>', html)
        html = BOLD.sub(r"<strong>\1</strong>", html)
        out.append(EMPHASIS.sub(r"<em>\1</em>", html))
    return "".join(out)


def _blocks(lines: list[str]) -> list[tuple[str, object]]:
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if FENCE.match(line):
            fence = line.strip()[:3]
            body, i = [], i + 1
            while i < len(lines) and lines[i].strip() != fence:
                body.append(lines[i])
                i += 1
            blocks.append(("code", "\n".join(body)))
            i += 1
        elif HEADING.match(line):
            blocks.append(("heading", HEADING.match(line).group(2)))
            i += 1
        elif BULLET.match(line) or NUMBERED.match(line):
            pattern = BULLET if BULLET.match(line) else NUMBERED
            items = []
            while i < len(lines) and pattern.match(lines[i]):
                items.append(pattern.match(lines[i]).group(1))
                i += 1
            blocks.append(("ul" if pattern is BULLET else "ol", items))
        elif not line.strip():
            i += 1
        else:
            body = []
            while i < len(lines) and lines[i].strip() and not any(
                p.match(lines[i]) for p in (FENCE, HEADING, BULLET, NUMBERED)
            ):
                body.append(lines[i])
                i += 1
            blocks.append(("p", "\n".join(body)))
    return blocks


def render(text: str) -> Markup:
    blocks = _blocks(text.split("\n"))
    if len(blocks) == 1 and blocks[0][0] == "p":
        return Markup(_inline(blocks[0][1]))
    html = []
    for kind, body in blocks:
        if kind == "code":
            html.append(f"<pre><code>{_text(body)}</code></pre>")
        elif kind == "heading":
            html.append(f"<h4>{_inline(body)}</h4>")
        elif kind in ("ul", "ol"):
            html.append(f"<{kind}>" + "".join(f"<li>{_inline(item)}</li>" for item in body) + f"</{kind}>")
        else:
            html.append(f"<p>{_inline(body)}</p>")
    return Markup("".join(html))
