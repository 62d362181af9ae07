"""Text a client declares about itself (software, platform, host name, user name,
a disconnect reason), made safe for the logs the same way for every protocol.

The connection log and the relay's own log lines are read by people, in
terminals and log viewers: a client must not be able to inject control
characters (terminal escapes, fake line breaks), reorder what a reader sees with
Unicode bidirectional overrides (the "Trojan Source" trick, CVE-2021-42574), hide
text with other format characters (zero-width joiners, soft hyphens), or make
one record huge.
"""

from __future__ import annotations

# Longest client text kept, in characters (ocserv keeps 255-byte device and
# user-agent strings; the CSTP module has always kept 256).
MAX_CLIENT_TEXT = 256


def clean(value: object) -> str | None:
    """Printable characters only, each run of white space one space, stripped,
    at most :data:`MAX_CLIENT_TEXT` characters; None when nothing is left or
    ``value`` is not text. ``str.isprintable`` is false for the control (Cc),
    format (Cf: the bidi embeddings, overrides and isolates U+202A-U+202E,
    U+2066-U+2069, zero-width characters), surrogate, private-use and unassigned
    categories, and for separators other than the ASCII space."""
    if not isinstance(value, str):
        return None
    out: list[str] = []
    space = False
    for ch in value:
        if ch.isspace():
            space = bool(out)  # leading white space is dropped
        elif ch.isprintable():
            if space:
                if len(out) + 1 >= MAX_CLIENT_TEXT:
                    break
                out.append(" ")
                space = False
            out.append(ch)
            if len(out) >= MAX_CLIENT_TEXT:
                break
    return "".join(out) or None
