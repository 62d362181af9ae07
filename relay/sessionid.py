"""Session identity: the one definition of a session ID's forms and lengths.

A session ID is ``RAW_LEN`` random bytes. Records, file names, command lines and
the packet log's index carry its *text* form, ``TEXT_LEN`` characters of URL-safe
base64 without padding (RFC 4648 section 5, as ``secrets.token_urlsafe``); the
packet log's blocks and the eBPF session map carry the raw bytes
(``RELAY_SESSION_ID_LEN`` in ebpf/record.h). Its first ``TAG_LEN`` characters are
the *tag* that the User-Agent stamp writes (``RELAY_HP_TAG_LEN`` in cext/hotpath.h).
relay.cext refuses a C module whose two lengths differ from these.

Every text form is canonical: the last character's unused low bits are zero, so
one ID has one spelling and a text match is an ID match.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Container

from relay.errors import RelayError

# 128 random bits, a UUID's size: the OWASP Session Management Cheat Sheet asks at
# least 64 bits of entropy of a session ID; twice that leaves no chance of two
# sessions of a relay network sharing an ID, or of an ID being guessed.
RAW_LEN = 16
# Base64 carries 6 bits a character: 128 bits take 22 characters unpadded.
TEXT_LEN = -(-RAW_LEN * 8 // 6)
# 48 bits, short enough to overwrite the tail of a User-Agent (usually a version
# number, as in "Firefox/128.0") and leave the rest of it readable; new() keeps
# the tags of the retained sessions unique, so a stamp names one session.
TAG_LEN = 8

_CHARS = "A-Za-z0-9_-"  # RFC 4648 section 5, the URL- and filename-safe alphabet
# A tag as bytes (a stamped User-Agent, a connection-log line), for byte scans.
TAG_PATTERN = b"[%s]{%d}" % (_CHARS.encode(), TAG_LEN)
_TAG = re.compile(TAG_PATTERN)
_PREFIX = re.compile(f"[{_CHARS}]{{1,{TEXT_LEN}}}")


class SessionIdError(RelayError, ValueError):
    """Text that is not a session ID (or not the start of one) where one is wanted."""


def to_text(raw: bytes) -> str:
    """The text form of the raw ID ``raw``."""
    if len(raw) != RAW_LEN:
        raise ValueError(f"a session ID is {RAW_LEN} bytes, not {len(raw)}")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def is_valid(text: str) -> bool:
    """Whether ``text`` is the text form of a session ID (canonical spelling)."""
    if len(text) != TEXT_LEN or not _PREFIX.fullmatch(text):
        return False
    # The last character holds 2 bits of the ID and 4 that must be zero.
    return to_text(base64.urlsafe_b64decode(text + "==")) == text


def is_prefix(text: str) -> bool:
    """Whether ``text`` is the start of some session ID (a tag is one), the whole
    of one included: what a ``--session`` filter accepts."""
    return bool(_PREFIX.fullmatch(text)) and (len(text) < TEXT_LEN or is_valid(text))


def to_raw(text: str) -> bytes:
    """The raw form of the text ID ``text``; SessionIdError for anything else."""
    if not is_valid(text):
        raise SessionIdError(f"not a session ID ({TEXT_LEN} URL-safe base64 "
                             f"characters): {text!r}")
    return base64.urlsafe_b64decode(text + "==")


def check(text: str, option: str, *, prefix: bool = False) -> str:
    """``text`` from the command line's ``option`` if it is a session ID (with
    ``prefix``, the start of one too), else SessionIdError naming the option."""
    if is_prefix(text) if prefix else is_valid(text):
        return text
    want = (f"a session ID or its start (1 to {TEXT_LEN} URL-safe base64 characters)"
            if prefix else f"a session ID ({TEXT_LEN} URL-safe base64 characters)")
    raise SessionIdError(f"{option} {text!r}: not {want}")


def tag(text: str) -> str:
    """The tag of the session ID ``text``, as the User-Agent stamp writes it."""
    return text[:TAG_LEN]


def is_tag(value: bytes) -> bool:
    """Whether ``value`` can be a tag: ``TAG_LEN`` characters of the ID's
    alphabet, so a stamp can never carry bytes that change a header's meaning."""
    return bool(_TAG.fullmatch(value))


def new(taken_tags: Container[str] = frozenset()) -> str:
    """A fresh random session ID (text form) whose tag is not in ``taken_tags``."""
    while True:
        text = to_text(secrets.token_bytes(RAW_LEN))
        if tag(text) not in taken_tags:
            return text
