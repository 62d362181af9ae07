"""Capture: the relay's eBPF capture and packet log against ``tcpdump -s 96 -w`` on
the same TAP traffic at rising rates.

Every run gets a network namespace and a TAP device of its own. bench/tapgen.c
(compiled here with gcc) writes TCP/IPv4 frames from a few sessions' MACs into
the TAP at a target rate for a fixed time, and counts what it wrote. Variants:

- ``relay``: relay.packetlog.capture.Capture (tc ingress eBPF, ring buffer) drained into a
  relay.packetlog.segments.PacketLogWriter by a separate process running an asyncio loop
  (uvloop, as ``relay serve`` does): records on disk vs frames written = loss;
- ``tcpdump``: ``tcpdump -s 96 -w FILE`` (default buffer): packets in the pcap vs
  frames written = loss (its "dropped by kernel" is kept too);
- ``none``: no capture, for the CPU the capture hooks add in the sender's context
  (both the eBPF program and AF_PACKET's copy run in the writer's system call).

Per rate: loss, CPU seconds of the capturing process per million packets, and
bytes per record on disk. Variants run round-robin per rate, repeated, medians
kept.

    python -m bench.capture [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.common import RESULTS, Row

NAME = "capture"
HERE = Path(__file__).resolve().parent
# Offered rates (frames/s): from light load to past what one core writes into a
# TAP (about 1.2 M/s here without a capture); quick mode keeps three.
FULL_RATES = (50_000, 100_000, 200_000, 400_000, 800_000, 1_200_000)
QUICK_RATES = (100_000, 400_000, 1_200_000)
# Seconds of traffic per run: several times the eBPF ring (16 MiB, ~150k
# records) and tcpdump's 2 MiB buffer at every rate, so neither rides out a run
# on its buffer alone.
FULL_SECONDS, QUICK_SECONDS = 4, 2
# Rounds of every (rate, variant): 3 for a median that one noisy run cannot move.
FULL_REPEATS, QUICK_REPEATS = 3, 1
# Sessions (source MACs 02:b0:00:00:00:01..) in tapgen's frames, all registered
# in the capture's session map, so every record is attributed as in the relay.
SESSIONS = 4
# The comparison: tcpdump keeping 96 bytes of every frame.
SNAPLEN = 96
PCAP_HEADER, PCAP_RECORD_HEADER = 24, 16
# Seconds to wait for a capture to be ready, or to finish writing after the
# traffic stops (bcc compiles the program at start: a few seconds).
READY_TIMEOUT, SETTLE_TIMEOUT = 60, 30
# tcpdump has caught up when its CPU time has not moved for this long: libpcap
# hands over a partly filled ring block only after tcpdump's 1000 ms timeout,
# so anything shorter would stop it with packets still in the ring.
SETTLE_QUIET = 1.5
SETTLE_POLL = 0.1
VARIANTS = ("relay", "tcpdump", "none")


def session_mac(i: int) -> bytes:
    return bytes([0x02, 0xB0, 0, 0, 0, i])  # as tapgen.c makes them


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def proc_cpu(pid: int) -> float:
    """CPU seconds of a single-threaded process, to the nanosecond (/proc/PID/stat
    counts 10 ms ticks, too coarse for a few seconds of tcpdump)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def build_tapgen(out_dir: Path) -> Path:
    exe = out_dir / "tapgen"
    sh("gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "tapgen.c"))
    return exe


def pcap_packets(path: Path) -> int:
    data = path.read_bytes()
    n, off = 0, PCAP_HEADER
    while off + PCAP_RECORD_HEADER <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        off += PCAP_RECORD_HEADER + incl
        n += 1
    return n


# -- the drain process -------------------------------------------------------------


def drain_child(ns: str, dev: str, data: str) -> None:
    """Runs in its own process: capture on ``dev``, drained on a uvloop loop.
    stdin lines: ``start`` (CPU accounting begins), ``stop`` (drain the rest,
    report). Prints ``ready`` then one JSON line."""
    import uvloop

    from relay import sessionid
    from relay.packetlog.capture import Capture
    from relay.packetlog.segments import PacketLogWriter

    writer = PacketLogWriter(data)
    writer.open()
    cap = Capture(dev, writer, netns=ns)
    cap.start()
    for i in range(1, SESSIONS + 1):
        cap.add_session(session_mac(i), sessionid.new(), f"198.18.{i}.2", 40000 + i)

    async def serve() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()
        cpu0 = [0.0]

        def on_stdin() -> None:
            for line in os.read(0, 4096).decode().split():
                if line == "start":
                    cpu0[0] = time.process_time()
                elif line == "stop" and not stopped.done():
                    stopped.set_result(None)

        loop.add_reader(0, on_stdin)
        cap.start_drain(loop)
        print("ready", flush=True)
        await stopped
        cap.stop_drain()
        cap.flush()
        return {"cpu_seconds": time.process_time() - cpu0[0], **cap.stats()}

    try:
        result = uvloop.run(serve())
    finally:
        writer.close()
        cap.close()
    result.pop("drops_per_cpu")
    print(json.dumps(result), flush=True)


# -- one run -----------------------------------------------------------------------


def one_run(variant: str, rate: int, seconds: int, tapgen: Path, tmp: Path) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    ns, dev = f"bcap-{tag}", f"bcap{tag}"
    out = tmp / f"{variant}-{rate}-{tag}"
    out.mkdir()
    sh("ip", "netns", "add", ns)
    procs: list[subprocess.Popen[str]] = []
    try:
        sh("ip", "-n", ns, "tuntap", "add", "dev", dev, "mode", "tap")
        # No IPv6 on the device: nothing but tapgen's frames crosses it.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        sh("ip", "-n", ns, "link", "set", dev, "up")
        if variant == "relay":
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.capture", "--drain-child", ns, dev,
                 str(out / "data")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=HERE.parent)
            procs.append(child)
            assert child.stdin and child.stdout
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the drain process did not start")
            child.stdin.write("start\n")
            child.stdin.flush()
        elif variant == "tcpdump":
            pcap = out / "out.pcap"
            dump = subprocess.Popen(
                ["ip", "netns", "exec", ns, "tcpdump", "-n", "-Z", "root", "-i", dev, "-s",
                 str(SNAPLEN), "-w", str(pcap)], stderr=subprocess.PIPE, text=True)
            procs.append(dump)
            assert dump.stderr
            if "listening on" not in dump.stderr.readline():
                raise RuntimeError("tcpdump did not start")
            cpu0 = proc_cpu(dump.pid)
        gen = json.loads(sh("ip", "netns", "exec", ns, str(tapgen), dev, str(rate),
                            str(seconds), str(SESSIONS)))
        result = {"rate": gen["written"] / gen["seconds"], "written": gen["written"],
                  "sender_cpu_seconds": gen["cpu_seconds"]}
        if variant == "relay":
            child.stdin.write("stop\n")
            child.stdin.flush()
            stats = json.loads(child.stdout.readline())
            child.wait(SETTLE_TIMEOUT)
            result |= relay_figures(out / "data", stats)
        elif variant == "tcpdump":
            cpu = settle(dump.pid)
            dump.send_signal(signal.SIGINT)
            _, err = dump.communicate(timeout=SETTLE_TIMEOUT)
            captured = pcap_packets(pcap)
            result |= {"captured": captured, "cpu_seconds": cpu - cpu0,
                       "kernel_drops": kernel_drops(err),
                       "bytes_per_record": pcap.stat().st_size / max(captured, 1)}
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def relay_figures(data: Path, stats: dict[str, Any]) -> dict[str, float]:
    from relay.packetlog import segments

    segs = segments.segment_files(data, archives=False)
    indexes = [segments.segment_index(p) for p in segments]
    if any(ix is None for ix in indexes):
        raise RuntimeError(f"a segment without an index in {data}")
    records = sum(ix["records"] for ix in indexes if ix)
    size = sum(p.stat().st_size for p in segs)
    return {"captured": records, "cpu_seconds": stats["cpu_seconds"],
            "kernel_drops": stats["drops"], "bytes_per_record": size / max(records, 1)}


def settle(pid: int) -> float:
    """tcpdump's CPU seconds once it has worked through its ring."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, since = proc_cpu(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < SETTLE_QUIET:
        time.sleep(SETTLE_POLL)
        now = proc_cpu(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def kernel_drops(stderr: str) -> int:
    for line in stderr.splitlines():
        if "dropped by kernel" in line:
            return int(line.split()[0])
    return 0


# -- the benchmark -----------------------------------------------------------------


def run(quick: bool) -> list[Row]:
    rates = QUICK_RATES if quick else FULL_RATES
    seconds = QUICK_SECONDS if quick else FULL_SECONDS
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        v: {r: [] for r in rates} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="relay-bench-capture-") as d:
        tmp = Path(d)
        tapgen = build_tapgen(tmp)
        for rate in rates:
            def variant(v: str, rate: int = rate) -> float:
                s = one_run(v, rate, seconds, tapgen, tmp)
                samples[v][rate].append(s)
                return s["rate"]
            common.interleaved({v: lambda v=v: variant(v) for v in VARIANTS}, repeats)
    per_rate = {v: {r: summarise(v, samples[v][r], samples["none"][r]) for r in rates}
                for v in ("relay", "tcpdump")}
    rows = figures(per_rate, rates, repeats)
    common.write(NAME, rows, {"seconds_per_run": seconds, "snaplen": SNAPLEN,
                              "sessions": SESSIONS,
                              # True: no loss at any rate, so the zero-loss rate is
                              # only the highest rate tapgen reached beside it.
                              "zero_loss_rate_is_lower_bound": {
                                  v: all(m[r]["loss"] == 0 for r in rates)
                                  for v, m in per_rate.items()},
                              "per_rate": {v: {str(r): f for r, f in m.items()}
                                           for v, m in per_rate.items()}})
    plot(per_rate, rates)
    return rows


def summarise(variant: str, runs: list[dict[str, float]], none: list[dict[str, float]]
              ) -> dict[str, float]:
    def med(f: str, rs: list[dict[str, float]] = runs) -> float:
        return statistics.median(r[f] for r in rs)

    mpkts = med("written") / 1e6
    loss = statistics.median(1 - r["captured"] / r["written"] for r in runs)
    return {
        "rate": med("rate"), "written": med("written"), "captured": med("captured"),
        "loss": max(loss, 0.0), "kernel_drops": med("kernel_drops"),
        "cpu_per_mpkt": med("cpu_seconds") / mpkts,
        # What the capture hook costs in the sender's system call (eBPF program or
        # AF_PACKET copy), against the same rate with no capture.
        "sender_cpu_per_mpkt_added": (med("sender_cpu_seconds")
                                      - med("sender_cpu_seconds", none)) / mpkts,
        "bytes_per_record": med("bytes_per_record"),
        "records_per_cpu_second": med("captured") / max(med("cpu_seconds"), 1e-9),
    }


def zero_loss_rate(m: dict[int, dict[str, float]], rates: tuple[int, ...]) -> float:
    """The highest achieved rate at which the median run lost nothing (0 if none):
    a lower bound when nothing was lost at any rate, as the sender's rate then
    depends on the hook's cost in its system call too."""
    return max((m[r]["rate"] for r in rates if m[r]["loss"] == 0), default=0.0)


def figures(per_rate: dict[str, dict[int, dict[str, float]]], rates: tuple[int, ...],
            runs: int) -> list[Row]:
    relay, dump = per_rate["relay"], per_rate["tcpdump"]
    # CPU compared at the highest rate both handled without loss (the same work
    # for both), else at the lowest rate.
    both = [r for r in rates if relay[r]["loss"] == 0 and dump[r]["loss"] == 0]
    at = max(both) if both else rates[0]
    rv, dv = "relay eBPF + drain", f"tcpdump -s {SNAPLEN} -w"
    return [
        Row(NAME, "highest zero-loss rate", "packets/s", dv, zero_loss_rate(dump, rates), rv,
            zero_loss_rate(relay, rates), runs, ">= 1"),
        Row(NAME, f"CPU of the capturing process at {at // 1000}k pps", "CPU s per Mpkt", dv,
            dump[at]["cpu_per_mpkt"], rv, relay[at]["cpu_per_mpkt"], runs, "<= 1",
            higher_is_better=False),
        Row(NAME, f"CPU incl. the hook in the sender at {at // 1000}k pps", "CPU s per Mpkt",
            dv, dump[at]["cpu_per_mpkt"] + dump[at]["sender_cpu_per_mpkt_added"], rv,
            relay[at]["cpu_per_mpkt"] + relay[at]["sender_cpu_per_mpkt_added"], runs,
            higher_is_better=False),
        Row(NAME, "bytes per record on disk (hot segment vs pcap)", "bytes", dv,
            dump[at]["bytes_per_record"], rv, relay[at]["bytes_per_record"], runs, "<= 0.25",
            higher_is_better=False),
        Row(NAME, f"records written per CPU second at {rates[-1] // 1000}k pps offered",
            "records/s", dv, dump[rates[-1]]["records_per_cpu_second"], rv,
            relay[rates[-1]]["records_per_cpu_second"], runs),
    ]


def plot(per_rate: dict[str, dict[int, dict[str, float]]], rates: tuple[int, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_loss, ax_cpu) = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, label in (("relay", "relay eBPF + drain"), ("tcpdump", f"tcpdump -s {SNAPLEN}")):
        xs = [per_rate[v][r]["rate"] / 1e3 for r in rates]
        ax_loss.plot(xs, [100 * per_rate[v][r]["loss"] for r in rates], "o-", label=label)
        ax_cpu.plot(xs, [per_rate[v][r]["cpu_per_mpkt"] for r in rates], "o-", label=label)
    ax_loss.set(xlabel="frames/s written (k)", ylabel="loss (%)", title="Loss vs rate")
    ax_cpu.set(xlabel="frames/s written (k)", ylabel="CPU s per Mpkt",
               title="Capturing process CPU")
    for ax in (ax_loss, ax_cpu):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{NAME}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rates, one short round")
    ap.add_argument("--drain-child", nargs=3, metavar=("NS", "DEV", "DATA"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drain_child:
        drain_child(*args.drain_child)
        return
    common.print_rows(run(args.quick))


if __name__ == "__main__":
    main()
