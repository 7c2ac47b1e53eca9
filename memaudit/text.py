"""Untrusted text made safe to show: one sanitiser for terminals, one for XML.

Prompts, captions, keys and file names come from files other people wrote. Printed raw, an
ANSI escape (`\\x1b[2J`) clears a terminal or a CI log and a bidi override reorders what the
reader sees; in XML, a `\\x00` or `\\x1b` makes the file malformed (XML 1.0 forbids them).
`html_text` (the XML set) does the same for the HTML report. All keep the text readable: a
forbidden character becomes its visible escape (`\\x1b`, `\\u202e`), so nothing is silently
dropped.
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls (0x9b is a one-byte CSI), bidi embeddings/overrides
# and isolates, line/paragraph separators.
_TERMINAL_BAD = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Everything XML 1.0 does not allow (https://www.w3.org/TR/xml/#charsets), plus the C1 range
# and the bidi controls (allowed, but they disguise text in CI viewers).
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                      "\ud800-\udfff\ufffe\uffff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def terminal_text(s: object, one_line: bool = True) -> str:
    """`s` as text safe for a terminal or a CI log: control characters shown escaped.

    With `one_line`, newlines are escaped too (a message stays one line); otherwise they
    are kept."""
    text = str(s)
    if not one_line:
        return "\n".join(_TERMINAL_BAD.sub(_escape, part) for part in text.split("\n"))
    return _TERMINAL_BAD.sub(_escape, text)


def xml_text(s: object) -> str:
    """`s` as text every XML 1.0 parser accepts (ElementTree escapes `<`, `&` and quotes);
    forbidden characters shown escaped."""
    return _XML_BAD.sub(_escape, str(s))


def html_text(s: object) -> str:
    """`s` as text for an HTML page (the report's template escapes `<`, `&` and quotes):
    control characters, NUL, ESC, bidi overrides (which reorder what a reviewer reads) and
    lone surrogates (which no UTF-8 page can hold) shown as visible escapes, like XML's."""
    return xml_text(s)
