"""Deliberately broken builds, each with the test meant to catch it: proof that a
check can fail. ``.venv/bin/python tests/mutants.py [WORD ...]`` applies one
mutant at a time to the working tree (only those whose name holds a WORD), runs
its tests, restores the file and prints CAUGHT or MISSED; exit status 1 if any
was missed. It edits files in place, so it refuses a tree with uncommitted
changes to them. tests/test_mutants.py keeps every mutant applicable (each
``old`` text occurs once), so the table cannot rot unseen."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "tests/test_e2e_hostile.py::"
ABUSE = "tests/test_e2e_abuse.py::"
OPS = "tests/test_e2e_operations.py::"
DEADLINES = HOSTILE + "test_stalled_handshake_and_login_are_closed_at_their_deadlines"
FLOOD = ABUSE + "test_handshake_flood_stays_within_caps_and_an_honest_client_connects"
BANS = ABUSE + "test_bans_survive_a_restart_and_expire"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # occurs exactly once in path
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS = (
    Mutant("handshake deadline 10 minutes", "relay/serve/link.py",
           "timeout = self.host.settings.handshake_timeout_s if tls", "timeout = 600 if tls",
           (DEADLINES,)),
    Mutant("login deadline 10 minutes", "relay/serve/link.py",
           "call_later(self.host.settings.login_timeout_s,", "call_later(600,", (DEADLINES,)),
    Mutant("CSTP dead peer after 100 DPD intervals", "relay/protocols/cstp.py",
           "float(DEAD_PEER_INTERVALS * p.dpd_s)", "float(100 * p.dpd_s)",
           (HOSTILE + "test_a_silent_tunnel_is_ended_as_a_dead_peer",)),
    Mutant("per-source handshake cap one too many", "relay/serve/abuse.py",
           "if src.handshakes >= self.cfg.handshakes_per_ip:",
           "if src.handshakes > self.cfg.handshakes_per_ip:", (FLOOD,)),
    Mutant("per-source handshake cap halved (every upper bound still holds)",
           "relay/serve/abuse.py", "if src.handshakes >= self.cfg.handshakes_per_ip:",
           "if src.handshakes >= self.cfg.handshakes_per_ip // 2:", (FLOOD,)),
    Mutant("delete_after cut-off off by one", "relay/packetlog/retention.py",
           "if now - newest >= self.delete_after:", "if now - newest > self.delete_after:",
           ("tests/test_retention.py::test_delete_after_cuts_at_the_newest_record_to_the_second",)),
    Mutant("bans not loaded at start", "relay/serve/abuse.py",
           "for ban in self.journal.load():", "for ban in []:", (BANS,)),
    Mutant("ban remove a no-op", "relay/serve/abuse.py",
           "        self.bans.pop(network)\n", "", (BANS,)),
    Mutant("a ban does not end live sessions", "relay/serve/worker.py",
           "if canonical_address(link.peer_ip) in net:", "if False:",
           (ABUSE + "test_dual_stack_listener_knows_ipv4_clients_by_their_ipv4_address",)),
    Mutant("[server] users ignored", "relay/serve/worker.py",
           "        if self.users is None:\n            return True",
           "        if True:\n            return True",
           (OPS + "test_server_users_for_both_protocols",)),
    Mutant("disk-full refusal off", "relay/packetlog/retention.py",
           "return self.disk_free() < self.refuse_free_bytes", "return False",
           (OPS + "test_a_disk_too_full_to_log_refuses_sessions_with_the_reason",)),
    Mutant("[logs] packet_segment ignored", "relay/packetlog/recording.py",
           "segment_seconds=parse_duration(cfg.logs.packet_segment),", "segment_seconds=3600,",
           (OPS + "test_packet_log_rotates_archives_and_deletes_in_the_running_relay",)),
    Mutant("reverse-DNS name not recorded", "relay/serve/worker.py",
           "hostname=link.client_hostname(), counters=s.traffic()",
           "hostname=None, counters=s.traffic()",
           (OPS + "test_client_config_output_connects_the_stock_clients_and_records_name_them",)),
    # The whole module: its last test verifies what the earlier ones left behind.
    Mutant("verify skips packet-log files", "relay/investigate/evidence.py",
           '        report.checked["packet-log files"] += 1\n', "        continue\n",
           ("tests/test_e2e_operations.py",)),
    Mutant("reload keeps the old abuse limits", "relay/serve/core.py",
           "        self.abuse.cfg = new.abuse\n", "",
           ("tests/test_e2e_service.py::test_metrics_shipping_reload_and_clean_shutdown",)),
    Mutant("CSTP length in the wrong byte order", "relay/protocols/cstp.py",
           "bytes((n >> 8, n & 0xFF, ptype, 0))", "bytes((n & 0xFF, n >> 8, ptype, 0))",
           ("tests/test_cstp.py::test_tunnel_frames_byte_for_byte_as_the_protocol_spells_them",)),
    Mutant("PRF's P_hash input in the wrong order", "relay/protocols/openvpn/keys.py",
           "hmac.digest(secret, a + seed, digest)", "hmac.digest(secret, seed + a, digest)",
           ("tests/test_openvpn.py::test_key_expansion_against_a_prf_written_from_the_rfc",
            "tests/test_openvpn_parts.py::test_tls1_prf_matches_openvpns_own_test_vector")),
    Mutant("pcap export writes the ack for the seq", "relay/investigate/pcapng.py",
           'rec["dst_port"], rec["seq"],', 'rec["dst_port"], rec["ack"],',
           ("tests/test_e2e_capture.py::test_packet_log_matches_tshark_with_two_sessions",)),
    Mutant("demo prints no web server log", "relay/demo.py",
           "print(access.read_text().strip())", "pass", ("tests/test_e2e_demo.py",)),
    Mutant("an end-to-end test without the netns marker", "tests/test_e2e_abuse.py",
           "pytestmark = pytest.mark.netns\n", "", ("tests/test_e2e_abuse.py", "--collect-only")),
    Mutant("ESC kept in client text", "relay/clienttext.py",
           "elif ch.isprintable():", 'elif ch.isprintable() or ch == "\\x1b":',
           ("tests/test_clienttext.py",)),
    Mutant("capture leaves its pins behind", "relay/packetlog/capture.py",
           "shutil.rmtree(self.pins, ignore_errors=True)", "pass", ("tests/test_capture.py",)),
    Mutant("doctor warns where tc clsact works", "relay/doctor.py",
           'return [tun, _ok("tc clsact", "a clsact qdisc was added to a TAP device")]',
           'return [tun, Check("tc clsact", "warn", "a clsact qdisc was added to a TAP device")]',
           ("tests/test_doctor.py::test_doctor_passes_on_a_set_up_host",)),
    Mutant("a floated client's packets not held until the move is recorded",
           "relay/serve/openvpn_link.py", "if self._moves_pending:", "if False:",
           ("tests/test_openvpn_float.py",
            "tests/test_e2e_openvpn.py::test_a_client_whose_nat_rebinds_keeps_its_session")),
)


def run(mutant: Mutant) -> tuple[bool, str]:
    """(caught, the first assertion lines or the summary) of one mutant."""
    f = ROOT / mutant.path
    text = f.read_text()
    f.write_text(text.replace(mutant.old, mutant.new, 1))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-x", *mutant.tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        f.write_text(text)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    why = [line for line in out if line.startswith("E ")][:2] or out[-1:]
    return proc.returncode != 0, " / ".join(line.strip()[:200] for line in why)


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *{m.path for m in chosen}],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if dirty:
        print(f"mutants: uncommitted changes to the files mutated:\n{dirty}", file=sys.stderr)
        return 2
    missed = 0
    for m in chosen:
        started = time.monotonic()
        caught, why = run(m)
        missed += not caught
        print(f"{'CAUGHT' if caught else 'MISSED'} {time.monotonic() - started:4.0f} s  "
              f"{m.name}: {why}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
