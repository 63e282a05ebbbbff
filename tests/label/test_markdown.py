"""The Markdown renderer of the labeling pages: what it renders, and that no input makes markup of its own."""

from __future__ import annotations

from html.parser import HTMLParser

from rlhf.label.markdown import render

ALLOWED = {"p", "h4", "ul", "ol", "li", "pre", "code", "strong", "em", "span"}


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def elements(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


def test_renders_code_lists_and_emphasis():
    text = "Run this:\n\n```bash\nfor f in *.txt; do echo \"$f\"; done\n```\n\n- **fast**\n- *safe* with `x < 2`\n\n1. one\n2. two"
    assert render(text) == (
        "<p>Run this:</p>"
        "<pre><code>for f in *.txt; do echo &#34;$f&#34;; done</code></pre>"
        "<ul><li><strong>fast</strong></li><li><em>safe</em> with <code>x &lt; 2</code></li></ul>"
        "<ol><li>one</li><li>two</li></ol>"
    )
    assert render("# Title\nbody") == "<h4>Title</h4><p>body</p>"
    assert render("one line, no markup") == "one line, no markup"  # a plain paragraph: just the text
    assert render("a\nb") == "a\nb"


def test_no_input_makes_a_script_a_handler_or_a_link():
    hostile = [
        "<script>alert(1)</script>",
        "```\n</code></pre><script>alert(1)</script>\n```",
        "`<img src=x onerror=alert(1)>`",
        "[click](javascript:alert(1))",
        '**<a href="javascript:alert(1)">x</a>**',
        "*\"><svg onload=alert(1)>*",
        "- <iframe src=//evil.example>",
    ]
    for text in hostile:
        parsed = elements(str(render(text)))
        assert set(parsed.tags) <= ALLOWED, text
        assert all(name == "class" and value in ("url", "bidi") for name, value in parsed.attrs), text
    assert render("[docs](https://evil.example)") == 'docs <span class="url">(https://evil.example)</span>'


def test_bidirectional_controls_are_shown():
    assert render("abc\u202edef") == 'abc<span class="bidi">[U+202E]</span>def'
    assert "[U+2067]" in render("```\nx\u2067y\n```")
