"""What the CLI prints from log data, made safe to show whatever the log holds.

The records come from clients (host names, User-Agents, OpenVPN peer info), from
relays of older versions, or from a forged copy of a data directory, so the
output layer trusts none of it. A table or text line shows every character that
is not printable (Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs other than
the space: C0/C1 controls with ESC, CR, LF, TAB and DEL, the bidi embeddings,
overrides and isolates U+202A-U+202E and U+2066-U+2069, U+200E/U+200F, U+061C,
zero-width characters) as a Python-style escape: ``\\x1b``, ``\\u202e``,
``\\U000e0001``, and ``\\t``, ``\\n``, ``\\r``. A backslash shows as ``\\\\``, so
that an escape is never confused with text that looks like one.

JSON keeps the exact values: the encoder escapes C0 controls, and the other
non-printable characters are escaped as ``\\uXXXX`` too, so that the text is
valid JSON, decodes to the same values, and moves no cursor nor reorders a line
on a terminal.

Files the investigation commands write (``-o``) name users: they are created
0600 and never written through a link (:func:`private_file`).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from relay.errors import RelayError
from relay.fsutil import PRIVATE_FILE, fsync_dir

# As Python's repr spells them; every other character by its code point.
_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(c: str) -> str:
    o = ord(c)
    if c in _SHORT:
        return _SHORT[c]
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def escape_text(value: Any) -> str:
    """``value`` as text for a table or a line on a terminal: one line, every
    non-printable character (and the backslash) escaped."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in text)


def _json_escape(c: str) -> str:
    o = ord(c)
    if o < 0x10000:
        return f"\\u{o:04x}"
    o -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as JSON (one line unless ``indent``), UTF-8 text kept readable,
    non-printable characters escaped (json.loads gives back exactly ``obj``)."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    if text.isascii() and "\x7f" not in text:
        return text
    # Structure is ASCII, so a non-ASCII or DEL character is inside a string,
    # where a \\u escape means the same character. (C0 controls the encoder has
    # escaped already.)
    return "".join(c if c.isprintable() or c < "\x7f" else _json_escape(c) for c in text)


# OWASP "CSV Injection": spreadsheets evaluate a cell that begins with one of these,
# also after leading whitespace (some strip it), and one that begins with a tab or CR.
_FORMULA_START = ("=", "+", "-", "@")
_FORMULA_WHITESPACE = ("\t", "\r")


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell: escaped as table text (escape_text), and prefixed
    with ``'`` (which a spreadsheet shows as text, not a formula) when it would be
    evaluated. None is the empty cell."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    cell = escape_text(text)
    if text[:1] in _FORMULA_WHITESPACE or text.lstrip()[:1] in _FORMULA_START:
        return "'" + cell
    return cell


def check_target(path: Path) -> str:
    """Refuse (one error line) an ``-o`` path that private_file would refuse, or
    whose directory does not exist, so a command can say so before its work;
    the ``-o PATH`` words of its errors."""
    where = f"-o {escape_text(path)}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise RelayError(f"{where}: no directory {escape_text(path.parent)} to write "
                             "into") from None
    except OSError as exc:
        raise RelayError(f"{where}: {exc.strerror}") from None
    else:
        if stat.S_ISLNK(st.st_mode):
            raise RelayError(f"{where}: is a symbolic link; refusing to write through it "
                             "(remove it or choose another name)")
        if not stat.S_ISREG(st.st_mode):
            raise RelayError(f"{where}: exists and is not a regular file")
    return where


@contextmanager
def private_file(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """A file at ``path``, mode 0600 whatever the umask, that appears there only
    complete: written to a new temporary file in the same directory (O_EXCL,
    O_NOFOLLOW, random name) and renamed over ``path``. A regular file already
    there is replaced (its hard links keep the old content: nothing is written
    through them); a symbolic link, or anything else that is not a regular file,
    is refused with one error line and left as it is. A link planted after the
    check is replaced by the rename, never followed."""
    where = check_target(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE)
    except OSError as exc:
        raise RelayError(f"{where}: {exc.strerror}") from None
    try:
        os.fchmod(fd, PRIVATE_FILE)  # the umask may have taken bits from 0600
        f = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8",
                                                          newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        raise RelayError(f"{where}: {exc.strerror}") from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
