"""Bans at scale: what a ban list of 5,000 and 100,000 entries costs each new
connection (relay.serve.abuse.Abuse.admit) and each new ban, against the design it
replaced, reimplemented here as the baseline: a linear scan that tests every ban
(``ip in ipaddress.ip_network(ban.network)``) per connection, and a ban list
rewritten whole (JSON, write + fsync + rename) per ban.

The bans are a realistic mix: 70% single IPv4 addresses (automatic bans), 25%
IPv6 /64s (automatic bans of IPv6 offenders), 5% operator CIDRs (/16, /24, /48);
the connections come from random addresses, 1 in 4 over IPv6, 1 in 10 banned.
The ban journal lives in a temporary directory on the file system of /var/tmp
(a disk, as a relay's data directory is, not tmpfs).

    python -m bench.bans [--quick]
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench import common
from bench.common import Row
from relay.config import AbuseConfig
from relay.fsutil import write_atomic
from relay.netaddr import Address
from relay.serve.abuse import Abuse, Ban, BanIndex, BanJournal

NAME = "bans"
SIZES = (5_000, 100_000)
# Each measurement runs for at least this long (and at least MIN_CALLS calls), so
# timer and scheduler noise stay small; the linear scan at 100,000 bans takes
# about a second per call.
FULL_SECONDS, QUICK_SECONDS = 1.0, 0.3
MIN_CALLS = 3
FULL_REPEATS, QUICK_REPEATS = 5, 3
SCRATCH = "/var/tmp"
BAN_S = 86400.0  # every planted ban outlives the benchmark
# Nothing but bans refuses a connection here: the rate and cap thresholds are out
# of the way, so every admit() is the same work.
UNLIMITED = AbuseConfig(rate_per_ip=1e9, burst_per_ip=10**9, rate_total=1e9,
                        burst_total=10**9, handshakes_per_ip=10**9, handshakes_total=10**9,
                        sessions_per_ip=10**9, strikes=10**9)


class LinearScan(BanIndex):
    """The look-up before the index: every ban, parsed and tested, per connection."""

    def covering(self, addr: Address, now: float) -> Ban | None:
        for ban in self.by_network.values():
            if ban.until > now and addr in ipaddress.ip_network(ban.network):
                return ban
        return None


def ban_mix(n: int, rng: random.Random, now: float) -> list[Ban]:
    bans: dict[str, Ban] = {}
    while len(bans) < n:
        r = rng.random()
        if r < 0.70:
            net = ipaddress.ip_network((rng.getrandbits(32), 32))
        elif r < 0.95:
            net = ipaddress.ip_network((rng.getrandbits(64) << 64, 64))
        else:
            plen = rng.choice((16, 24, 48))
            bits = 32 if plen < 32 else 128
            net = ipaddress.ip_network((rng.getrandbits(bits), plen), strict=False)
        bans[str(net)] = Ban(str(net), now + BAN_S, "bench")
    return list(bans.values())


def connections(n: int, bans: list[Ban], rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.10:
            net = ipaddress.ip_network(rng.choice(bans).network)
            out.append(str(net.network_address + rng.randrange(net.num_addresses)))
        elif r < 0.325:
            out.append(str(ipaddress.IPv6Address(rng.getrandbits(128))))
        else:
            out.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
    return out


def per_call(fn: Callable[[int], None], seconds: float) -> float:
    """Seconds per call of ``fn(i)`` (i counts up), over at least ``seconds``."""
    calls, t0 = 0, time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - t0 < seconds:
        fn(calls)
        calls += 1
    return (time.perf_counter() - t0) / calls


def admitting(abuse: Abuse, probes: list[str], seconds: float) -> Callable[[], float]:
    """A measurement of seconds per admit() of connections from ``probes``."""
    return lambda: per_call(lambda i: abuse.admit(probes[i % len(probes)]), seconds)


def abuse_with(bans: list[Ban], data_dir: Path) -> Abuse:
    """An Abuse whose journal holds ``bans`` (written as one snapshot)."""
    data_dir.mkdir(exist_ok=True)
    BanJournal(data_dir).compact(bans)
    return Abuse(UNLIMITED, data_dir, lambda record: None, time.time)


def run(quick: bool) -> list[Row]:
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    rng = random.Random(13)
    now = time.time()
    rows: list[Row] = []
    extra: dict[str, object] = {"scratch_dir": SCRATCH, "seconds_per_measurement": seconds}
    with tempfile.TemporaryDirectory(dir=SCRATCH, prefix="bench-bans-") as tmp:
        scratch = Path(tmp)
        empty = abuse_with([], scratch / "none")
        for size in SIZES:
            bans = ban_mix(size, rng, now)
            probes = connections(10_000, bans, rng)
            indexed = abuse_with(bans, scratch / f"index-{size}")
            linear = abuse_with([], scratch / f"linear-{size}")
            linear.bans = LinearScan()
            for ban in bans:
                linear.bans.put(ban)

            variants = {"linear": admitting(linear, probes, seconds),
                        "index": admitting(indexed, probes, seconds)}
            if size == SIZES[-1]:
                variants["none"] = admitting(empty, probes, seconds)
            medians = common.interleaved(variants, repeats)
            us = {k: v * 1e6 for k, v in medians.items()}
            rows.append(Row(NAME, f"admit() per connection, {size:,} bans", "us",
                            "linear scan (before)", us["linear"], "ban index", us["index"],
                            repeats, higher_is_better=False))
            if "none" in us:
                rows.append(Row(NAME, f"admit() per connection, {size:,} bans vs none", "us",
                                "no bans", us["none"], f"{size:,} bans", us["index"], repeats,
                                higher_is_better=False))
        # Reading SIZES[-1] bans at start: the before-design's one JSON array of
        # every ban, vs the journal replayed into the index.
        old_path = scratch / "bans.json"
        old_bans = {b.network: b for b in bans}
        write_atomic(old_path, json.dumps([asdict(b) for b in bans], indent=1).encode())

        def load_json(_: int) -> None:
            {b["network"]: Ban(**b) for b in json.loads(old_path.read_text())}

        def load_journal(_: int) -> None:
            Abuse(UNLIMITED, indexed.journal.path.parent, lambda record: None, time.time)

        medians = common.interleaved(
            {"json": lambda: per_call(load_json, seconds),
             "journal": lambda: per_call(load_journal, seconds)}, repeats)
        rows.append(Row(NAME, f"reading {SIZES[-1]:,} bans at start", "s",
                        "bans.json (before)", medians["json"], "bans.jsonl into the index",
                        medians["journal"], repeats, higher_is_better=False))
        # Adding a ban to SIZES[-1] bans: a journal append vs a rewrite of the list.
        fresh = (f"198.18.{n >> 8 & 255}.{n & 255}" for n in itertools.count())

        def rewrite(_: int) -> None:
            ban = Ban(f"{next(fresh)}/32", time.time() + BAN_S, "bench")
            old_bans[ban.network] = ban
            write_atomic(old_path, json.dumps([asdict(b) for b in old_bans.values()],
                                              indent=1).encode())

        def append(_: int) -> None:
            indexed.add_ban(next(fresh), BAN_S, "bench")

        medians = common.interleaved(
            {"rewrite": lambda: per_call(rewrite, seconds),
             "append": lambda: per_call(append, seconds)}, repeats)
        rows.append(Row(NAME, f"adding a ban to {SIZES[-1]:,} bans", "ms",
                        "rewrite bans.json (before)", medians["rewrite"] * 1e3,
                        "append to bans.jsonl", medians["append"] * 1e3, repeats,
                        higher_is_better=False))
        extra["bans_json_bytes"] = old_path.stat().st_size
        extra["bans_jsonl_bytes"] = os.path.getsize(indexed.journal.path)
    common.write(NAME, rows, extra)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter measurements")
    common.print_rows(run(ap.parse_args().quick))


if __name__ == "__main__":
    main()
