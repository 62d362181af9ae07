"""relay.clienttext: client-declared text made safe for the logs, one way for
every protocol."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.clienttext import MAX_CLIENT_TEXT, clean

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("Open AnyConnect VPN Agent v9.01-3", "Open AnyConnect VPN Agent v9.01-3"),
        ("2.6.3", "2.6.3"),
        # Terminal escapes and fake log lines lose their control characters.
        ("evil\x1b[2J\x1b[31mred", "evil[2J[31mred"),
        ("ok\r\n2026-11-25 relay: INFO: forged line", "ok 2026-11-25 relay: INFO: forged line"),
        ("nul\x00byte\x7fdel\x85nel", "nulbytedel nel"),  # NEL is a line break
        # Trojan Source: every bidi embedding, override and isolate goes.
        (f"{BIDI}gnp.exe", "gnp.exe"),
        ("user\u202eexe.txt", "userexe.txt"),
        # Other format characters: zero-width space/joiner, BOM, soft hyphen.
        ("a\u200bb\u200dc\ufeffd\u00ade", "abcde"),
        # White space of any kind is one space; none at the ends.
        ("  evil\tagent\u00a0\u3000v1 \n", "evil agent v1"),
        # Surrogates (from a careless decoder), private use, unassigned: dropped.
        ("x\udcff\ue000\U000e0001y", "xy"),
        # Letters of any script and emoji stay.
        ("Ubuntu 24.04 · 東京 📱", "Ubuntu 24.04 · 東京 📱"),
        ("", None), ("   ", None), ("\x1b\u202e\t", None), (None, None), (42, None),
    ],
)
def test_clean(raw: object, cleaned: str | None) -> None:
    assert clean(raw) == cleaned


def test_capped_at_the_named_length() -> None:
    assert clean("x" * 10_000) == "x" * MAX_CLIENT_TEXT
    # The cap counts what is kept, not what was dropped on the way.
    assert clean("\x00" * 10_000 + "abc") == "abc"
    capped = clean("ab " * 1000)
    assert capped is not None and len(capped) <= MAX_CLIENT_TEXT
    assert not capped.endswith(" ")


@given(st.text())
def test_any_text_comes_out_printable_bounded_and_stable(raw: str) -> None:
    out = clean(raw)
    if out is None:
        return
    assert 0 < len(out) <= MAX_CLIENT_TEXT
    assert out == out.strip() and "  " not in out
    assert all(ch.isprintable() for ch in out)
    assert clean(out) == out
