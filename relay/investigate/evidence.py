"""Tamper evidence: verifying the chains, and disclosure bundles.

The chains (relay/chain.py) bind every closed packet-log segment and archive and
every sealed connection-log day to a SHA-256 link. :func:`verify` replays a
chain into the set of files that must exist with their digests and compares it
with the directory; it reads only files and needs nothing of the relay that wrote
them, so it works on a copy on another machine. Connection-log days are hashed
over their uncompressed content, so compression leaves them verifiable; archived
segments have their own link naming the segment (and its digest) they replace.

A disclosure bundle is an uncompressed tar: ``manifest.json`` (query, digests
of every member, the source files' links and the chain lines from the oldest
source link to the head), ``sessions.json``, ``connlog.jsonl`` (the sessions'
connection-log records as written), ``packets.jsonl`` (the packet records, each
naming its segment) and ``packets.pcapng``. :func:`verify_bundle` checks it
alone, and with a copy of the data directory also that the links are that
relay's and the records are in the files the links bind.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import struct
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import tzinfo
from pathlib import Path
from typing import IO, Any

import zstandard

from relay import chain
from relay.chain import Report, check_links
from relay.connlog import reader
from relay.errors import RelayError
from relay.investigate import pcapng, search
from relay.packetlog import segments
from relay.safeout import json_text, private_file
from relay.sessionquery import Query, row_dict
from relay.times import rfc3339_ms

BUNDLE_FORMAT = "relay-disclosure-1"
MANIFEST = "manifest.json"
MEMBERS = ("sessions.json", "connlog.jsonl", "packets.jsonl", "packets.pcapng")
# A manifest is JSON of digests and chain lines: a year of hourly segments' close,
# archive and delete links (26,280 of ~300 bytes, 7.9 MB) fits twice; a larger one
# is not a bundle of ours and is not read.
MAX_MANIFEST_BYTES = 16 << 20
FILE_MODE = 0o600
# verify-bundle reads members in pieces of this size, so that its memory does not
# grow with them (1 MiB: shutil's copy buffer is 64 KiB-1 MiB; SHA-256 throughput
# no longer rises beyond it).
CHUNK_BYTES = 1 << 20
# A bundle has five entries (the manifest and MEMBERS); a tar of many more is not
# one, and tarfile keeps every entry's header in memory.
MAX_BUNDLE_ENTRIES = 64
# tarfile reads a PAX/GNU extended header whole; disclose's are tens of bytes (an
# mtime), and PAX headers of long names stay far below 64 KiB.
MAX_TAR_HEADER_BYTES = 64 << 10
# One line of packets.jsonl or connlog.jsonl: a packet record is ~400 bytes, a
# connection-log record at most ~100 KB (256 destinations of host names of up to
# 253 characters, RFC 1035); a longer line is not a record and is not parsed.
MAX_RECORD_LINE_BYTES = 1 << 20
# Chain lines per chain in a manifest: twice a year of hourly segments' links
# (26,280); it bounds the problems a forged manifest can make verify-bundle list.
MAX_CHAIN_LINES = 1 << 16


def _packet_state(links: list[tuple[bytes, dict[str, Any] | None]],
                  report: Report) -> dict[str, dict[str, Any]]:
    """File name -> the link it must match, after closes, archives and deletions."""
    expected: dict[str, dict[str, Any]] = {}
    for _, link in links:
        if not link:
            continue
        name, event = str(link.get("file")), link.get("event")
        if event == "archive":
            source = expected.pop(str(link.get("source")), None)
            if source is not None and source.get("sha256") != link.get("source_sha256"):
                report.problem("modified", str(link.get("source")),
                               f"was not the chained segment when archived into {name}")
        if event in ("close", "archive"):
            live = expected.get(name)
            if live is not None and live.get("sha256") != link.get("sha256"):
                # Closing a name that still holds a chained file means the file was
                # renamed over (as recovery did before it learnt not to): the
                # earlier link's content is gone though nothing deleted it.
                report.problem("replaced", name,
                               f"{chain.link_desc(link)} chains new content under this name "
                               f"while the file of {chain.link_desc(live)} was never deleted "
                               f"or archived: that file was overwritten and is lost")
            expected[name] = link
        elif event == "delete":
            expected.pop(name, None)
    return expected


def verify_packets(data_dir: Path, report: Report) -> None:
    links = chain.read_links(chain.chain_path(data_dir, chain.PACKETS_CHAIN))
    check_links(links, "packets chain", report)
    expected = _packet_state(links, report)
    by_digest = chain.by_digest(expected)
    on_disk = {p.name: p for p in segments.segment_files(data_dir)}
    for name, p in sorted(on_disk.items()):
        if name.endswith(segments.OPEN_SUFFIX):
            report.notes.append(f"{name}: being written, chained when it closes")
            continue
        report.checked["packet-log files"] += 1
        if not chain.check_file(report, name, chain.file_digest(p), expected.get(name),
                                by_digest):
            report.problem("unchained", name, "no chain link: not written by this relay's "
                                              "log, or its link was removed")
    for name in sorted(set(expected) - set(on_disk)):
        report.problem("missing", name, f"gone from the directory, but "
                                         f"{chain.link_desc(expected[name])} chains it and no "
                                         "delete link removes it")


def verify_connlog(data_dir: Path, report: Report) -> None:
    links = chain.read_links(chain.chain_path(data_dir, chain.CONNLOG_CHAIN))
    check_links(links, "connlog chain", report)
    expected = chain.sealed_days(links)
    by_digest = chain.by_digest(expected)
    newest_sealed = max(expected, default="")
    days = reader.log_days(data_dir)
    for day in days:
        where = f"connlog {day.name}"
        try:
            got = chain.content_digest(reader.content(day))
        except (OSError, zstandard.ZstdError) as exc:
            report.problem("unreadable", where, f"cannot be read whole: {exc}")
            continue
        report.checked["connection-log days"] += 1
        if chain.check_file(report, where, got, expected.get(day.name), by_digest):
            continue
        if day.name > newest_sealed:
            report.notes.append(f"{where}: not sealed yet (sealed after the day ends)")
        else:
            report.problem("unchained", where, "older than sealed days but has no chain link")
    for name in sorted(set(expected) - {day.name for day in days}):
        report.problem("missing", f"connlog {name}", "chained but not in the directory")


def verify_anchors(data_dir: Path, report: Report) -> None:
    """Every chain head the connection log recorded (and shipped) must still be a
    link: a chain cut back to an earlier head fails here."""
    known = {chain.line_digest(line)
             for name in (chain.PACKETS_CHAIN, chain.CONNLOG_CHAIN)
             for line, _ in chain.read_links(chain.chain_path(data_dir, name))}
    for rec in reader.iter_records(data_dir):
        head = rec.get("chain_link")
        if isinstance(head, str):
            report.checked["anchors"] += 1
            if head not in known:
                report.problem("missing", f"chain link {head[:16]}...",
                               f"recorded by the connection log ({rec.get('action')} at "
                               f"{rec.get('time')}) but gone from the chain")


def verify(data_dir: Path) -> Report:
    if not Path(data_dir).is_dir():
        raise RelayError(f"{data_dir}: not a directory")
    report = Report()
    verify_packets(Path(data_dir), report)
    verify_connlog(Path(data_dir), report)
    verify_anchors(Path(data_dir), report)
    return report


# ------------------------------------------------------------------ disclosure


def _chain_span(data_dir: Path, name: str, needed: set[str]) -> list[str]:
    """Chain lines from the first link in ``needed`` (by digest) to the head."""
    lines = chain.read_links(chain.chain_path(data_dir, name))
    first = next((i for i, (line, _) in enumerate(lines)
                  if chain.line_digest(line) in needed), len(lines))
    return [line.decode() for line, _ in lines[first:]]


def _source_links(data_dir: Path, name: str, key: str,
                  wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The newest link of each wanted file (by ``key``: file or day)."""
    out: dict[str, dict[str, Any]] = {}
    for line, link in chain.read_links(chain.chain_path(data_dir, name)):
        if link and link.get(key) in wanted and link.get("event") in ("close", "archive"):
            out[str(link[key])] = {**link, "digest": chain.line_digest(line)}
    return out


def disclose(data_dir: Path, q: Query, tz: tzinfo, out: Path, *,
             on_error: search.ErrorReport, argv: list[str]) -> dict[str, Any]:
    rows, kept = search.search(data_dir, q, on_error=on_error, keep_packets=True)
    packets = [{**rec, "segment": path.name} for path, rec in kept]
    records = [rec for r in rows for rec in (r.connect, r.disconnect) if rec]
    pcap = io.BytesIO()
    pcapng.write(pcap, packets, app="relay logs disclose")
    members = {
        "sessions.json": json_text([row_dict(r, tz) for r in rows],
                                   indent=1).encode(),
        "connlog.jsonl": b"".join(json_text(r).encode() + b"\n" for r in records),
        "packets.jsonl": b"".join(json.dumps(p).encode() + b"\n" for p in packets),
        "packets.pcapng": pcap.getvalue(),
    }
    seg_links = _source_links(data_dir, chain.PACKETS_CHAIN, "file",
                              {p["segment"] for p in packets})
    day_links = _source_links(data_dir, chain.CONNLOG_CHAIN, "day",
                              {str(r["time"])[:10] for r in records})
    unchained = sorted({p["segment"] for p in packets} - set(seg_links)) + \
        sorted({str(r["time"])[:10] for r in records} - set(day_links))
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": rfc3339_ms(time.time()),
        "command": ["relay", *argv],
        "query": {k: v for k, v in vars(q).items() if v is not None},
        "members": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                    for n, b in members.items()},
        "sources": {"packets": seg_links, "connlog": day_links},
        "unchained_sources": unchained,
        "chain": {
            "packets": _chain_span(data_dir, chain.PACKETS_CHAIN,
                                   {lk["digest"] for lk in seg_links.values()}),
            "connlog": _chain_span(data_dir, chain.CONNLOG_CHAIN,
                                   {lk["digest"] for lk in day_links.values()}),
        },
    }
    members[MANIFEST] = json.dumps(manifest, indent=1).encode()
    with private_file(out, binary=True) as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (MANIFEST, *MEMBERS):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), FILE_MODE, time.time()
            tar.addfile(info, io.BytesIO(members[name]))
    return {"sessions": len(rows), "packets": len(packets),
            "manifest_sha256": hashlib.sha256(members[MANIFEST]).hexdigest()}


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU extended header (long names, big sizes) whole:
    one larger than MAX_TAR_HEADER_BYTES is refused before it is read."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"an extended header of {self.size} bytes (more than {MAX_TAR_HEADER_BYTES})")
        return super()._proc_member(tarfile_)


_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                     tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _entry_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link (to {info.linkname})"
    if info.islnk():
        return f"a hard link (to {info.linkname})"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isdir():
        return "a directory"
    return "a FIFO" if info.isfifo() else f"an entry of type {info.type!r}"


def _entries(path: Path, tar: tarfile.TarFile,
             report: Report) -> dict[str, tarfile.TarInfo]:
    """The bundle's regular members by name; every other entry is a problem."""
    entries: dict[str, tarfile.TarInfo] = {}
    seen: set[str] = set()
    for i, info in enumerate(tar):
        if i >= MAX_BUNDLE_ENTRIES:
            raise RelayError(f"{path}: more than {MAX_BUNDLE_ENTRIES} entries: not a "
                             "disclosure bundle")
        name = info.name
        if name in seen:
            report.problem("duplicate", name, "in the bundle twice: which one is meant?")
            entries.pop(name, None)
            continue
        seen.add(name)
        if "/" in name or name in ("", ".", ".."):
            report.problem("unsafe-path", name, "a path, not a member name: a bundle is flat")
        elif not info.isreg():
            report.problem("unexpected", name, f"{_entry_kind(info)}, not a file")
        else:
            entries[name] = info
    if MANIFEST in seen and MANIFEST not in entries:
        raise RelayError(f"{path}: its {MANIFEST} is not a single file: not a bundle "
                         "disclose wrote")
    return entries


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(m: Any) -> str | None:
    """What makes ``m`` not a manifest this verifier can check, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != BUNDLE_FORMAT:
        return f"its format is not {BUNDLE_FORMAT}"
    members = m.get("members")
    if not isinstance(members, dict) or set(members) != set(MEMBERS):
        return f"members must list exactly {', '.join(MEMBERS)}"
    for name, meta in members.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                and _is_size(meta.get("size"))):
            return f"members {name}: needs sha256 (text) and size (a byte count)"
    sources, spans = m.get("sources"), m.get("chain")
    for kind in ("packets", "connlog"):
        links = sources.get(kind) if isinstance(sources, dict) else None
        if not isinstance(links, dict) or not all(isinstance(v, dict) for v in links.values()):
            return f"sources {kind}: must map file names to chain links"
        span = spans.get(kind) if isinstance(spans, dict) else None
        if not isinstance(span, list) or not all(isinstance(x, str) for x in span):
            return f"chain {kind}: must be a list of chain lines"
        if len(span) > MAX_CHAIN_LINES:
            return f"chain {kind}: more than {MAX_CHAIN_LINES} lines"
        if len(links) > len(span):
            return f"sources {kind}: more sources than chain lines to hold their links"
    return None


def _read_manifest(path: Path, tar: tarfile.TarFile, info: tarfile.TarInfo | None,
                   report: Report) -> dict[str, Any]:
    if info is None:
        raise RelayError(f"{path}: no {MANIFEST}: not a disclosure bundle")
    if info.size > MAX_MANIFEST_BYTES:
        raise RelayError(f"{path}: {MANIFEST} is {info.size} bytes, more than "
                         f"{MAX_MANIFEST_BYTES}: not a disclosure bundle")
    raw = _member(tar, info).read()
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        raise RelayError(f"{path}: {MANIFEST} is not JSON") from None
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise RelayError(f"{path}: {MANIFEST} is malformed: {problem}")
    report.notes.append(f"manifest SHA-256 {hashlib.sha256(raw).hexdigest()}")
    return manifest


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    f = tar.extractfile(info)
    assert f is not None  # a regular member (_entries)
    return f


def _digest(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK_BYTES):
        h.update(chunk)
    return h.hexdigest()


def _pcap_packets(f: IO[bytes], size: int) -> int:
    """Enhanced packet blocks in a pcapng member, walked block header to block
    header; -1 when malformed."""
    off, n = 0, 0
    while off + 12 <= size:
        head = f.read(8)
        if len(head) < 8:
            return -1
        btype, length = struct.unpack("<II", head)
        if length < 12 or off + length > size:
            return -1
        n += btype == pcapng.BT_EPB
        f.seek(length - 8, io.SEEK_CUR)
        off += length
    return n if off == size else -1


def _records(f: IO[bytes], name: str, report: Report) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines member, a line at a time; the lines that
    are not one are one problem (the first of them, and how many)."""
    bad, first_bad = 0, 0
    for lineno in itertools.count(1):
        line = f.readline(MAX_RECORD_LINE_BYTES + 1)
        if not line:
            break
        if len(line) > MAX_RECORD_LINE_BYTES:
            report.problem("oversized", f"{name} line {lineno}",
                           f"longer than {MAX_RECORD_LINE_BYTES} bytes: not a record")
            return
        doc = _json_or_none(line)
        if doc is None:
            bad += 1
            first_bad = first_bad or lineno
            continue
        yield doc
    if bad:
        report.problem("malformed", f"{name} line {first_bad}",
                       f"not a JSON object ({bad} such line(s))")


def verify_bundle(path: Path, data_dir: Path | None) -> Report:
    """Check a bundle a member at a time, each read in CHUNK_BYTES pieces (or a
    record line at a time): memory stays flat whatever the members' sizes (with
    ``data_dir``, the disclosed records are held for the comparison)."""
    report = Report()
    try:
        tar = tarfile.open(path, "r:", tarinfo=_BoundedTarInfo)  # noqa: SIM115 (with below)
    except (OSError, tarfile.TarError) as exc:
        raise RelayError(f"{path}: not a bundle tar file ({exc})") from None
    try:
        with tar:
            _verify_bundle(path, tar, data_dir, report)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise RelayError(f"{path}: damaged bundle ({exc})") from None
    return report


def _verify_bundle(path: Path, tar: tarfile.TarFile, data_dir: Path | None,
                   report: Report) -> None:
    entries = _entries(path, tar, report)
    manifest = _read_manifest(path, tar, entries.pop(MANIFEST, None), report)
    reported = {p["file"] for p in report.problems}
    listed: dict[str, dict[str, Any]] = manifest["members"]
    for name, meta in listed.items():
        info = entries.get(name)
        report.checked["members"] += 1
        if info is None:
            if name not in reported:
                report.problem("missing", name, "listed in the manifest, not in the bundle")
        elif info.size > meta["size"]:
            report.problem("oversized", name, f"{info.size} bytes, the manifest lists "
                                              f"{meta['size']}")
            entries.pop(name)  # not read further
        elif info.size != meta["size"] or _digest(_member(tar, info)) != meta["sha256"]:
            report.problem("modified", name, "digest differs from the manifest")
    for name in sorted(set(entries) - set(listed)):
        report.problem("unexpected", name, "not listed in the manifest")
    lines: dict[str, list[tuple[bytes, dict[str, Any] | None]]] = {}
    for kind, key in (("packets", "file"), ("connlog", "day")):
        span = [(s.encode("utf-8", "surrogatepass"), _json_or_none(s))
                for s in manifest["chain"][kind]]
        lines[kind] = span
        first = span[0][1].get("n", 0) if span and span[0][1] else 0
        check_links(span, f"{kind} chain", report, first=first if isinstance(first, int) else 0)
        digests = {chain.line_digest(line) for line, _ in span}
        for name, link in manifest["sources"][kind].items():
            if link.get("digest") not in digests:
                report.problem("unchained", f"{kind} source {name}",
                               "its link is not in the bundle's chain span")
            elif link.get(key) != name:
                report.problem("modified", f"{kind} source {name}", "link names another file")
    segs = manifest["sources"]["packets"]
    # Only with data_dir are records kept (per segment, as compared with its own).
    by_segment: dict[str, Counter[str]] = {}
    packets, unchained, first_unchained = 0, 0, ""
    jsonl = entries.get("packets.jsonl")
    if jsonl is not None:
        for p in _records(_member(tar, jsonl), "packets.jsonl", report):
            packets += 1
            seg = p.get("segment")
            if not isinstance(seg, str) or seg not in segs:
                unchained += 1
                first_unchained = first_unchained or f"packet {p.get('time')}"
            elif data_dir is not None:
                by_segment.setdefault(seg, Counter())[_packet_key(p)] += 1
    if unchained:
        report.problem("unchained", first_unchained,
                       f"names no chained segment ({unchained} packet record(s))")
    records: list[dict[str, Any]] = []
    if "connlog.jsonl" in entries:
        recs = _records(_member(tar, entries["connlog.jsonl"]), "connlog.jsonl", report)
        if data_dir is None:
            report.checked["connection-log records"] += sum(1 for _ in recs)
        else:
            records = list(recs)
    pcap = entries.get("packets.pcapng")
    # (A missing or oversized member is a problem already, not read.)
    if jsonl is not None and pcap is not None and \
            _pcap_packets(_member(tar, pcap), pcap.size) != packets:
        report.problem("modified", "packets.pcapng", "its packets are not packets.jsonl's")
    report.checked["packet records"] += packets
    if data_dir is not None:
        report.checked["connection-log records"] += len(records)
        _against_data_dir(Path(data_dir), lines, by_segment, records, report)


def _packet_key(rec: dict[str, Any]) -> str:
    """A packet record as compared with a segment's (without the bundle's
    ``segment`` field)."""
    return json.dumps({k: v for k, v in rec.items() if k != "segment"}, sort_keys=True)


def _json_or_none(text: str | bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _against_data_dir(data_dir: Path,
                      lines: dict[str, list[tuple[bytes, dict[str, Any] | None]]],
                      by_segment: dict[str, Counter[str]], records: list[dict[str, Any]],
                      report: Report) -> None:
    """The bundle's chain lines are this relay's, its files still match them, and
    every disclosed record is in the file its link binds."""
    for kind, name in (("packets", chain.PACKETS_CHAIN), ("connlog", chain.CONNLOG_CHAIN)):
        mine = {line for line, _ in chain.read_links(chain.chain_path(data_dir, name))}
        for line, doc in lines[kind]:
            if line not in mine:
                report.problem("unchained", f"{kind} link {doc.get('n') if doc else '?'}",
                               f"not in {data_dir}'s chain")
    verified = verify(data_dir)
    bad_files = {p["file"] for p in verified.problems}
    for seg, want in by_segment.items():
        if "/" in seg or seg in ("", ".", ".."):
            report.problem("unsafe-path", seg, "a segment name that is a path: not looked up")
            continue
        path = segments.packets_dir(data_dir) / seg
        if not path.exists():  # archived since: the archive link names it as source
            path = path.with_name(seg.removesuffix(segments.SEGMENT_SUFFIX)
                                  + segments.ARCHIVE_SUFFIX)
        if path.name in bad_files or not path.exists():
            report.problem("missing", seg, "source segment absent or failing verify")
            continue
        held = _segment_records(path)
        if want - held:
            report.problem("modified", seg, f"{sum((want - held).values())} disclosed "
                                            "packet records are not in it")
    days = {day.name: day for day in reader.log_days(data_dir)}
    for rec in records:
        day = str(rec.get("time"))[:10]
        if day not in days:
            report.problem("missing", f"connlog {day}", "source day absent")
            continue
        content = reader.content(days[day])
        # surrogatepass: a forged record may hold a lone surrogate; it is then
        # reported as not in the day, not a crash.
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass")
        if line not in content:
            report.problem("modified", f"connlog {day}",
                           f"record {rec.get('id')} is not in it as disclosed")


def _segment_records(path: Path) -> Counter[str]:
    held: Counter[str] = Counter()
    dec = segments._Decoder()
    for rec in segments._iter_segment(path, dec, None, None, None, None, None, None,
                                       lambda p, r: None):
        held[json.dumps(rec, sort_keys=True)] += 1
    return held
