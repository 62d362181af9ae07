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
import json
import struct
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

from relay import chain, connlog, investigate, packetlog, pcapng
from relay.connlog_retention import day_content
from relay.errors import RelayError

BUNDLE_FORMAT = "relay-disclosure-1"
MANIFEST = "manifest.json"
MEMBERS = ("sessions.json", "connlog.jsonl", "packets.jsonl", "packets.pcapng")
# A manifest is JSON of digests and chain lines: far below this; a larger one
# is not a bundle of ours and is not parsed.
MAX_MANIFEST_BYTES = 64 << 20
FILE_MODE = 0o600


@dataclass
class Report:
    problems: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, kind: str, where: str, detail: str) -> None:
        self.problems.append({"kind": kind, "file": where, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes,
                "checked": dict(self.checked)}

    def text(self) -> str:
        lines = [f"{p['kind'].upper()}: {p['file']}: {p['detail']}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.checked.items()))
        lines.append(f"{'OK' if self.ok else 'FAILED'}: checked {counts or 'nothing'}; "
                     f"{len(self.problems)} problem(s)")
        return "\n".join(lines) + "\n"


def check_links(lines: list[tuple[bytes, dict[str, Any] | None]], name: str,
                report: Report, first: int = 0) -> None:
    """Link numbers consecutive from ``first`` and each ``prev`` the digest of the
    link before (the first link's ``prev`` is taken on trust unless first == 0).
    A line that is not a link (torn by a crash mid-append, or edited) is one
    problem; the links after it are checked against the last good one, which is
    what relay/chain.py chains a new link to."""
    prev = chain.GENESIS if first == 0 else None
    n = first
    for i, (line, doc) in enumerate(lines):
        if doc is None:
            after = f"after link {n - 1}" if n > first else "before the first link"
            report.problem("broken-chain", f"{name} line {i + 1}",
                           f"not a link ({after}): a write cut short by a crash, or an edit")
            continue
        where = f"{name} link {n}"
        if doc.get("n") != n:
            report.problem("broken-chain", where,
                           f"numbered {doc.get('n')}: links removed, added or reordered")
        elif prev is not None and doc.get("prev") != prev:
            report.problem("broken-chain", where,
                           "prev is not the digest of the link before: the chain was edited")
        prev = chain.line_digest(line)
        n += 1
    report.checked[f"{name} links"] += len(lines)


def _link_desc(link: dict[str, Any]) -> str:
    """How a problem names the link it is about: its number and what it holds."""
    records = f", {link['records']} records" if link.get("records") is not None else ""
    return f"chain link {link.get('n')} ({link.get('event')}{records})"


def _compare(report: Report, where: str, got: tuple[str, int], link: dict[str, Any],
             by_digest: dict[str, str]) -> None:
    digest, size = got
    if digest == link.get("sha256"):
        return
    other = by_digest.get(digest)
    if other is not None:
        report.problem("reordered", where, f"holds the content chained as {other}")
    elif size < int(link.get("size") or 0):
        report.problem("truncated", where, f"{size} bytes, chained with {link.get('size')}")
    else:
        report.problem("modified", where, f"content replaced or modified since "
                                          f"{_link_desc(link)}: SHA-256 {digest[:16]}..., "
                                          f"chained {str(link.get('sha256'))[:16]}...")


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
                               f"{_link_desc(link)} chains new content under this name "
                               f"while the file of {_link_desc(live)} was never deleted "
                               f"or archived: that file was overwritten and is lost")
            expected[name] = link
        elif event == "delete":
            expected.pop(name, None)
    return expected


def verify_packets(data_dir: Path, report: Report) -> None:
    links = chain.read_links(chain.chain_path(data_dir, chain.PACKETS_CHAIN))
    check_links(links, "packets chain", report)
    expected = _packet_state(links, report)
    by_digest = {str(lk.get("sha256")): name for name, lk in expected.items()}
    on_disk = {p.name: p for p in packetlog.segment_files(data_dir)}
    for name, p in sorted(on_disk.items()):
        if name.endswith(packetlog.OPEN_SUFFIX):
            report.notes.append(f"{name}: being written, chained when it closes")
            continue
        got = chain.file_digest(p)
        report.checked["packet-log files"] += 1
        if name in expected:
            _compare(report, name, got, expected[name], by_digest)
        elif got[0] in by_digest:
            report.problem("reordered", name, f"holds the content chained as "
                                              f"{by_digest[got[0]]}")
        else:
            report.problem("unchained", name, "no chain link: not written by this relay's "
                                              "log, or its link was removed")
    for name in sorted(set(expected) - set(on_disk)):
        report.problem("missing", name, f"gone from the directory, but "
                                         f"{_link_desc(expected[name])} chains it and no "
                                         "delete link removes it")


def _day_files(data_dir: Path) -> dict[str, dict[str, Path]]:
    days: dict[str, dict[str, Path]] = {}
    for p in connlog.day_files(data_dir):
        kind = "zst" if p.name.endswith(connlog.ZST_SUFFIX) else "plain"
        days.setdefault(connlog.day_of(p), {})[kind] = p
    return days


def verify_connlog(data_dir: Path, report: Report) -> None:
    links = chain.read_links(chain.chain_path(data_dir, chain.CONNLOG_CHAIN))
    check_links(links, "connlog chain", report)
    expected: dict[str, dict[str, Any]] = {}
    for _, link in links:
        if link and link.get("event") == "close":
            expected[str(link.get("day"))] = link
        elif link and link.get("event") == "delete":
            expected.pop(str(link.get("day")), None)
    by_digest = {str(lk.get("sha256")): day for day, lk in expected.items()}
    newest_sealed = max(expected, default="")
    for day, files in sorted(_day_files(data_dir).items()):
        data = day_content(files)
        got = (hashlib.sha256(data).hexdigest(), len(data))
        report.checked["connection-log days"] += 1
        if day in expected:
            _compare(report, f"connlog {day}", got, expected[day], by_digest)
        elif got[0] in by_digest:
            report.problem("reordered", f"connlog {day}",
                           f"holds the content chained as {by_digest[got[0]]}")
        elif day > newest_sealed:
            report.notes.append(f"connlog {day}: not sealed yet (sealed after the day ends)")
        else:
            report.problem("unchained", f"connlog {day}", "older than sealed days but "
                                                          "has no chain link")
    for day in sorted(set(expected) - set(_day_files(data_dir))):
        report.problem("missing", f"connlog {day}", "chained but not in the directory")


def verify_anchors(data_dir: Path, report: Report) -> None:
    """Every chain head the connection log recorded (and shipped) must still be a
    link: a chain cut back to an earlier head fails here."""
    known = {chain.line_digest(line)
             for name in (chain.PACKETS_CHAIN, chain.CONNLOG_CHAIN)
             for line, _ in chain.read_links(chain.chain_path(data_dir, name))}
    for rec in connlog.iter_records(data_dir):
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


def disclose(data_dir: Path, q: investigate.Query, tz: tzinfo, out: Path, *,
             on_error: investigate.ErrorReport, argv: list[str]) -> dict[str, Any]:
    rows, kept = investigate.search(data_dir, q, on_error=on_error, keep_packets=True)
    wanted = {r.session_id for r in rows}
    packets = [{**rec, "segment": path.name} for path, rec in kept
               if rec["session_id"] in wanted]
    records = [rec for r in rows for rec in (r.connect, r.disconnect) if rec]
    pcap = io.BytesIO()
    pcapng.write(pcap, packets, app="relay logs disclose")
    members = {
        "sessions.json": json.dumps([investigate.row_dict(r, tz) for r in rows], indent=1,
                                    ensure_ascii=False).encode(),
        "connlog.jsonl": b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                                  for r in records),
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
        "created": connlog.rfc3339_ms(time.time()),
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
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in (MANIFEST, *MEMBERS):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(members[name]), FILE_MODE, time.time()
                tar.addfile(info, io.BytesIO(members[name]))
        tmp.replace(out)
    except OSError as exc:
        raise RelayError(f"-o {out}: {exc.strerror}") from None
    return {"sessions": len(rows), "packets": len(packets),
            "manifest_sha256": hashlib.sha256(members[MANIFEST]).hexdigest()}


def _read_bundle(path: Path, report: Report) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise RelayError(f"{path}: not a bundle tar file ({exc})") from None
    blobs: dict[str, bytes] = {}
    with tar:
        for info in tar.getmembers():
            if not info.isfile():
                report.problem("unexpected", info.name, "not a regular member of a bundle")
                continue
            f = tar.extractfile(info)
            blobs[info.name] = f.read() if f else b""
    raw = blobs.pop(MANIFEST, None)
    if raw is None or len(raw) > MAX_MANIFEST_BYTES:
        raise RelayError(f"{path}: no {MANIFEST}: not a disclosure bundle")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise RelayError(f"{path}: {MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise RelayError(f"{path}: not a {BUNDLE_FORMAT} bundle")
    report.notes.append(f"manifest SHA-256 {hashlib.sha256(raw).hexdigest()}")
    return manifest, blobs


def _pcap_packets(data: bytes) -> int:
    """Enhanced packet blocks in a pcapng byte string; -1 when malformed."""
    off, n = 0, 0
    while off + 12 <= len(data):
        btype, length = struct.unpack_from("<II", data, off)
        if length < 12 or off + length > len(data):
            return -1
        n += btype == pcapng.BT_EPB
        off += length
    return n if off == len(data) else -1


def verify_bundle(path: Path, data_dir: Path | None) -> Report:
    report = Report()
    manifest, blobs = _read_bundle(path, report)
    listed = manifest.get("members") or {}
    for name, meta in listed.items():
        blob = blobs.get(name)
        if blob is None:
            report.problem("missing", name, "listed in the manifest, not in the bundle")
        elif hashlib.sha256(blob).hexdigest() != meta.get("sha256") or \
                len(blob) != meta.get("size"):
            report.problem("modified", name, "digest differs from the manifest")
        report.checked["members"] += 1
    for name in sorted(set(blobs) - set(listed)):
        report.problem("unexpected", name, "not listed in the manifest")
    lines: dict[str, list[tuple[bytes, dict[str, Any] | None]]] = {}
    for kind, key in (("packets", "file"), ("connlog", "day")):
        span = [(s.encode(), _json_or_none(s)) for s in manifest["chain"].get(kind, [])]
        lines[kind] = span
        first = span[0][1].get("n", 0) if span and span[0][1] else 0
        check_links(span, f"{kind} chain", report, first=first)
        digests = {chain.line_digest(line) for line, _ in span}
        for name, link in (manifest["sources"].get(kind) or {}).items():
            if link.get("digest") not in digests:
                report.problem("unchained", f"{kind} source {name}",
                               "its link is not in the bundle's chain span")
            elif link.get(key) != name:
                report.problem("modified", f"{kind} source {name}", "link names another file")
    packets = [json.loads(x) for x in blobs.get("packets.jsonl", b"").splitlines()]
    records = [json.loads(x) for x in blobs.get("connlog.jsonl", b"").splitlines()]
    segs = manifest["sources"].get("packets") or {}
    for p in packets:
        if p.get("segment") not in segs:
            report.problem("unchained", f"packet {p.get('time')}", "names no chained segment")
    if _pcap_packets(blobs.get("packets.pcapng", b"")) != len(packets):
        report.problem("modified", "packets.pcapng", "its packets are not packets.jsonl's")
    report.checked["packet records"] += len(packets)
    report.checked["connection-log records"] += len(records)
    if data_dir is not None:
        _against_data_dir(Path(data_dir), manifest, lines, packets, records, report)
    return report


def _json_or_none(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _against_data_dir(data_dir: Path, manifest: dict[str, Any],
                      lines: dict[str, list[tuple[bytes, dict[str, Any] | None]]],
                      packets: list[dict[str, Any]], records: list[dict[str, Any]],
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
    by_segment: dict[str, list[dict[str, Any]]] = {}
    for p in packets:
        by_segment.setdefault(str(p.get("segment")), []).append(p)
    for seg, recs in by_segment.items():
        path = packetlog.packets_dir(data_dir) / seg
        if not path.exists():  # archived since: the archive link names it as source
            path = path.with_name(seg.removesuffix(packetlog.SEGMENT_SUFFIX)
                                  + packetlog.ARCHIVE_SUFFIX)
        if path.name in bad_files or not path.exists():
            report.problem("missing", seg, "source segment absent or failing verify")
            continue
        held = _segment_records(path)
        want = Counter(json.dumps({k: v for k, v in r.items() if k != "segment"},
                                  sort_keys=True) for r in recs)
        if want - held:
            report.problem("modified", seg, f"{sum((want - held).values())} disclosed "
                                            "packet records are not in it")
    days = _day_files(data_dir)
    for rec in records:
        day = str(rec.get("time"))[:10]
        if day not in days:
            report.problem("missing", f"connlog {day}", "source day absent")
            continue
        content = day_content(days[day])
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
        if line not in content:
            report.problem("modified", f"connlog {day}",
                           f"record {rec.get('id')} is not in it as disclosed")


def _segment_records(path: Path) -> Counter[str]:
    held: Counter[str] = Counter()
    dec = packetlog._Decoder()
    for rec in packetlog._iter_segment(path, dec, None, None, None, None, None, None,
                                       lambda p, r: None):
        held[json.dumps(rec, sort_keys=True)] += 1
    return held
