"""Session identity (relay.sessionid): the lengths, the two forms, tags, validation
of what the command line passes, and the C module built with the same lengths."""

from __future__ import annotations

import base64
import itertools

import pytest

from relay import cext, sessionid
from relay.errors import RelayError
from relay.sessionid import RAW_LEN, TAG_LEN, TEXT_LEN, SessionIdError


def test_the_lengths_are_the_documented_format() -> None:
    # README and the packet-log format: 128 random bits, 22 characters, 8-character tag.
    assert (RAW_LEN, TEXT_LEN, TAG_LEN) == (16, 22, 8)
    sid = sessionid.new()
    assert len(sid) == TEXT_LEN and len(sessionid.to_raw(sid)) == RAW_LEN
    assert sessionid.tag(sid) == sid[:TAG_LEN]


def test_text_is_unpadded_urlsafe_base64_of_the_raw_bytes() -> None:
    raw = bytes(range(0xF0, 0x100))  # bytes whose base64 uses "-" and "_"
    text = sessionid.to_text(raw)
    assert text == base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert "-" in text or "_" in text
    assert sessionid.to_raw(text) == raw
    with pytest.raises(ValueError, match="16 bytes, not 15"):
        sessionid.to_text(raw[1:])


@pytest.mark.parametrize("bad", [
    "",
    "AAAAAAAA",  # a tag, not an ID
    "A" * 23,
    "A" * 21 + "B",  # decodes, to the bytes of "A" * 22: not the ID's spelling
    "A" * 21 + "=",
    "A" * 20 + "+/",  # standard base64, not the URL-safe alphabet
    "A" * 20 + "\u00e9A",
    " " + "A" * 21,
])
def test_anything_but_an_id_is_refused_with_a_clear_error(bad: str) -> None:
    assert not sessionid.is_valid(bad)
    with pytest.raises(SessionIdError, match=r"^not a session ID \(22 URL-safe base64"):
        sessionid.to_raw(bad)


def test_every_spelling_is_canonical() -> None:
    """Of the 64 possible last characters, only the 4 whose unused bits are zero
    spell an ID: one ID, one text, so comparing texts compares IDs."""
    ok = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
          if sessionid.is_valid("A" * 21 + c)]
    assert ok == ["A", "Q", "g", "w"]


def test_session_id_errors_are_one_line_cli_errors_and_value_errors() -> None:
    with pytest.raises(RelayError):
        sessionid.to_raw("nope")
    with pytest.raises(ValueError):
        sessionid.to_raw("nope")


def test_prefix_filters() -> None:
    sid = sessionid.new()
    for prefix in (sid[:1], sessionid.tag(sid), sid[:TEXT_LEN - 1], sid):
        assert sessionid.is_prefix(prefix)
        assert sessionid.check(prefix, "--session", prefix=True) == prefix
    for bad in ("", "a b", "abc!", sid + "A", "A" * 21 + "B"):
        assert not sessionid.is_prefix(bad)
        with pytest.raises(SessionIdError, match=r"^--session '.*': not a session ID or its "
                                                 r"start \(1 to 22 URL-safe"):
            sessionid.check(bad, "--session", prefix=True)
    assert sessionid.check(sid, "--session") == sid
    with pytest.raises(SessionIdError, match=r"^--session '.{8}': not a session ID \(22"):
        sessionid.check(sessionid.tag(sid), "--session")


def test_tags() -> None:
    assert sessionid.is_tag(b"aZ09-_xY")
    for bad in (b"", b"short", b"toolong12", b"bad tag!", b"abc\r\nxyz", b"\xff" * 8):
        assert not sessionid.is_tag(bad)


def test_new_ids_avoid_the_taken_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = itertools.chain([b"\x00" * RAW_LEN] * 3, [b"\xff" * RAW_LEN])
    monkeypatch.setattr(sessionid.secrets, "token_bytes", lambda n: next(draws))
    taken = {sessionid.tag(sessionid.to_text(b"\x00" * RAW_LEN))}
    assert sessionid.new(taken) == sessionid.to_text(b"\xff" * RAW_LEN)


def test_new_ids_are_random_and_valid() -> None:
    ids = {sessionid.new() for _ in range(1000)}
    assert len(ids) == 1000 and all(sessionid.is_valid(s) for s in ids)


# ------------------------------------------------------------------ the C side


def test_the_c_module_was_built_with_these_lengths() -> None:
    assert cext.lib.RELAY_HP_TAG_LEN == TAG_LEN
    for struct in ("struct relay_record", "struct relay_session"):
        assert cext.ffi.sizeof(cext.ffi.new(f"{struct} *").session_id) == RAW_LEN


def test_a_c_module_with_other_lengths_is_refused() -> None:
    cext.check_build(cext.EXPECTED_ABI, TAG_LEN, {RAW_LEN})  # this build
    with pytest.raises(RelayError, match=r"stamps 12-character tags \(RELAY_HP_TAG_LEN in "
                                         r"cext/hotpath.h\) but relay.sessionid.TAG_LEN is 8"):
        cext.check_build(cext.EXPECTED_ABI, 12, {RAW_LEN})
    with pytest.raises(RelayError, match=r"hold 32-byte session IDs \(RELAY_SESSION_ID_LEN"):
        cext.check_build(cext.EXPECTED_ABI, TAG_LEN, {32})
    with pytest.raises(RelayError, match="hold 16/32-byte session IDs"):
        cext.check_build(cext.EXPECTED_ABI, TAG_LEN, {RAW_LEN, 32})
    with pytest.raises(RelayError, match=rf"stale \(ABI 0, want {cext.EXPECTED_ABI}\)"):
        cext.check_build(0, TAG_LEN, {RAW_LEN})
