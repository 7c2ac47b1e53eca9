"""A report page's outline, parsed with the standard library's HTML parser: its sections (h2)
in order, every plot (svg) with whether it is folded inside a <details>, and every id."""

from __future__ import annotations

from html.parser import HTMLParser

#: The reading order of the report (docs/report.md).
SECTIONS = ["verdict", "flagged", "summary", "groups", "quality", "prompts", "diagnostics",
            "provenance"]


class Outline(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.events: list[tuple[str, object]] = []  # ("section", id) | ("plot", folded)
        self.ids: list[str] = []
        self._details = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "h2":
            self.events.append(("section", a.get("id")))
        elif tag == "svg":
            self.events.append(("plot", self._details > 0))
        elif tag == "details":
            self._details += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self._details -= 1

    @property
    def sections(self) -> list[str]:
        return [v for k, v in self.events if k == "section"]

    def at(self, section: str) -> int:
        return self.events.index(("section", section))

    @property
    def plots(self) -> list[tuple[int, bool]]:
        """(position among the events, folded) of every plot."""
        return [(i, v) for i, (k, v) in enumerate(self.events) if k == "plot"]
