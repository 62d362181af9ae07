"""A throw-away network for the demo, the tests and the benchmarks.

::

    client-1 198.18.1.2 --veth-- 198.18.1.1 ┐
    client-2 198.18.2.2 --veth-- 198.18.2.1 ├ relay ── 198.19.0.1 --veth-- 198.19.0.2 internet
    ...                                     ┘  (relay0, NAT)                    (nginx)

Addresses come from 198.18.0.0/15, the block RFC 2544 sets aside for benchmark
networks, so they can never be mistaken for a real network; nothing is routed to
the host's uplink. Every namespace name carries a per-run prefix, and
:meth:`Topology.destroy` removes everything it made, however far set-up got.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import RelayError
from relay.tlsconf import ensure_self_signed

INTERNET_IP = "198.19.0.2"
RELAY_UPLINK_IP = "198.19.0.1"
WEB_PORT = 80
WEB_TLS_PORT = 443
# The name the web server's certificate carries; clients reach it with
# curl --resolve so that the TLS ClientHello carries it as SNI.
WEB_TLS_NAME = "www.example.test"
VPNC_SCRIPT = "/usr/share/vpnc-scripts/vpnc-script"
# The loss injector (Topology.inject_loss) and what attaching it takes: the
# clsact parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / _EGRESS) in
# pkt_sched.h) and every protocol (ETH_P_ALL).
LOSS_SOURCE = Path(__file__).resolve().parents[1] / "ebpf" / "loss.c"
TC_PARENT_INGRESS, TC_PARENT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
ETH_P_ALL = 0x0003


def client_ip(i: int) -> str:
    return f"198.18.{i}.2"


def relay_ip(i: int) -> str:
    return f"198.18.{i}.1"


def run(cmd: Sequence[str], ns: str | None = None, check: bool = True,
        **kw: object) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(full, text=True, capture_output=True, check=False, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RelayError(f"{' '.join(full)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass
class Topology:
    prefix: str
    clients: int = 1
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay-net-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def relay_ns(self) -> str:
        return f"{self.prefix}-relay"

    @property
    def internet_ns(self) -> str:
        return f"{self.prefix}-inet"

    def client_ns(self, i: int) -> str:
        return f"{self.prefix}-cli{i}"

    @property
    def uplink(self) -> str:
        return "up0"

    # -- build ----------------------------------------------------------------------

    def create(self) -> Topology:
        try:
            self._add_ns(self.relay_ns)
            self._add_ns(self.internet_ns)
            self._veth(self.relay_ns, self.uplink, RELAY_UPLINK_IP,
                       self.internet_ns, "eth0", INTERNET_IP, 24)
            for i in range(1, self.clients + 1):
                ns = self.client_ns(i)
                self._add_ns(ns)
                # vpnc-script rewrites /etc/resolv.conf; `ip netns exec` bind-mounts
                # /etc/netns/NS/resolv.conf over it, so the host's stays untouched.
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "resolv.conf").write_text("# relay test namespace\n")
                self._veth(ns, "eth0", client_ip(i), self.relay_ns, f"c{i}", relay_ip(i), 24)
                run(["ip", "route", "add", "default", "via", relay_ip(i)], ns)
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        with contextlib.suppress(RelayError):
            run(["ip", "netns", "del", ns])  # a leftover of a killed run
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "link", "set", "lo", "up"], ns)

    def _veth(self, ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str,
              plen: int) -> None:
        # Short-lived names in the host's namespace, renamed once inside the test's:
        # random per pair, so neither another run nor a pair a killed run left
        # behind can collide with them (IFNAMSIZ: at most 15 characters).
        tag = f"rv{secrets.token_hex(5)}"
        tmp_a, tmp_b = f"{tag}a", f"{tag}b"
        run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        run(["ip", "link", "set", tmp_a, "netns", ns_a, "name", if_a])
        run(["ip", "link", "set", tmp_b, "netns", ns_b, "name", if_b])
        run(["ip", "addr", "add", f"{ip_a}/{plen}", "dev", if_a], ns_a)
        run(["ip", "addr", "add", f"{ip_b}/{plen}", "dev", if_b], ns_b)
        run(["ip", "link", "set", if_a, "up"], ns_a)
        run(["ip", "link", "set", if_b, "up"], ns_b)

    # -- processes ------------------------------------------------------------------

    def spawn(self, ns: str, cmd: Sequence[str], log_name: str, stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        logf = open(self.workdir / log_name, "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=logf,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start_web(self) -> Path:
        """nginx in the internet namespace; returns its access log path (it logs
        the client address and the full User-Agent of every request)."""
        www = self.workdir / "www"
        www.mkdir(exist_ok=True)
        for path in (self.workdir, www):
            path.chmod(0o755)
        (www / "index.html").write_text("<h1>hello from the internet namespace</h1>\n")
        (www / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        for f in www.iterdir():
            f.chmod(0o644)
        access = self.workdir / "access.log"
        conf = self.workdir / "nginx.conf"
        cert, key = ensure_self_signed(self.workdir / "web-tls", WEB_TLS_NAME)
        tmp = self.workdir / "nginx-tmp"
        tmp.mkdir(exist_ok=True)
        conf.write_text(f"""
daemon off;
user root;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    log_format relay '$remote_addr "$request" $status "$http_user_agent" "$http_host"';
    access_log {access} relay;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000;
    server {{
        listen {INTERNET_IP}:{WEB_PORT};
        listen {INTERNET_IP}:{WEB_TLS_PORT} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {www};
    }}
}}
""")
        self.spawn(self.internet_ns, ["nginx", "-c", str(conf)], "nginx.out")
        wait_for(lambda: run(["ss", "-ltn", f"sport = :{WEB_PORT}"], self.internet_ns)
                 .stdout.count("LISTEN") > 0, 10, "nginx to listen")
        return access

    def start_relay(self, data_dir: Path, server_keys: str = "", name: str = "relay",
                    wait: bool = True, abuse_keys: str = "", logs_keys: str = "",
                    extra_tables: str = "", nat: bool = True,
                    listen: str = "0.0.0.0:443",
                    config: str | None = None) -> subprocess.Popen[bytes]:
        """``relay serve`` in the relay namespace on ``listen``, NAT towards the
        internet namespace unless ``nat`` is false; ``server_keys``, ``logs_keys``
        and ``abuse_keys`` are extra TOML lines for those tables, ``extra_tables``
        whole tables more; or ``config``, the whole file."""
        conf = self.workdir / f"{name}.toml"
        uplink = f'uplink = "{self.uplink}"\n' if nat else ""
        conf.write_text(config if config is not None else
                        f'[server]\nlisten = "{listen}"\n{uplink}{server_keys}\n'
                        f'[logs]\ndata_dir = "{data_dir}"\n{logs_keys}\n'
                        f'[abuse]\n{abuse_keys}\n{extra_tables}')
        log_name = f"{name}.log"
        proc = self.spawn(self.relay_ns, [*relay_command(), "serve", "--config", str(conf)],
                          log_name)
        if wait:
            marker_count = self.log(log_name).count("listening on")
            wait_for(lambda: self.log(log_name).count("listening on") > marker_count
                     or proc.poll() is not None, 30, "relay serve to listen")
            if proc.poll() is not None:
                raise RelayError(f"relay serve exited: {self.log(log_name)[-2000:]}")
        return proc

    def connect_openconnect(self, i: int, data_dir: Path, user: str = "anyone",
                            name: str | None = None, extra: Sequence[str] = (),
                            wait: bool = True) -> subprocess.Popen[bytes]:
        """The stock openconnect client in client namespace ``i``, pinned to the
        relay's self-signed certificate; waits until its tun device has an address."""
        from relay.tlsconf import SELF_SIGNED_CERT, pin_sha256

        ns = self.client_ns(i)
        cmd = ["openconnect", "--protocol=anyconnect", "--servercert",
               pin_sha256(data_dir / SELF_SIGNED_CERT), "--user", user, "--passwd-on-stdin",
               "--non-inter", "--script", VPNC_SCRIPT, "--interface", "tun0",
               *extra, f"https://{relay_ip(i)}/"]
        proc = self.spawn(ns, cmd, name or f"openconnect-{i}.log", stdin=b"any password\n")
        if wait:
            wait_for(lambda: self.tunnel_up(i) or proc.poll() is not None, 30,
                     f"openconnect in {ns} to configure tun0")
            if proc.poll() is not None:
                raise RelayError(f"openconnect exited: {self.log(name or f'openconnect-{i}.log')}")
        return proc

    def inject_loss(self, ns: str, dev: str, fraction: float) -> None:
        """Drop ``fraction`` of the packets leaving and entering ``dev`` in ``ns``, at
        random (ebpf/loss.c on tc clsact egress and ingress); 0 removes the loss.
        The filters hold the program, so it stays loaded after this returns."""
        from bcc import BPF
        from pyroute2 import IPRoute

        with IPRoute(netns=ns) as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            with contextlib.suppress(Exception):  # a qdisc left from an earlier call
                ipr.tc("del", "clsact", index)
            if fraction <= 0:
                return
            bpf = BPF(src_file=str(LOSS_SOURCE).encode(), cflags=[
                f"-DRELAY_LOSS_THRESHOLD={min(int(fraction * 2**32), 2**32 - 1)}U"])
            fn = bpf.load_func(b"relay_loss", BPF.SCHED_CLS)
            ipr.tc("add", "clsact", index)
            for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
                ipr.tc("add-filter", "bpf", index, 1, fd=fn.fd, name="relay_loss",
                       parent=parent, prio=1, protocol=ETH_P_ALL, direct_action=True)
            bpf.cleanup()

    def tunnel_up(self, i: int) -> bool:
        """tun0 has its address and the route to the internet namespace. vpnc-script
        sets the address first: a connection opened before the route moves leaves
        by eth0, untunnelled, and never gets an answer."""
        return self.tunnel_ip(i) is not None and "dev tun0" in run(
            ["ip", "route", "get", INTERNET_IP], self.client_ns(i), check=False).stdout

    def tunnel_ip(self, i: int) -> str | None:
        out = run(["ip", "-o", "-4", "addr", "show", "dev", "tun0"], self.client_ns(i),
                  check=False).stdout.split()
        return out[out.index("inet") + 1].split("/")[0] if "inet" in out else None

    def curl(self, i: int, path: str = "/", *args: str, timeout: float = 20,
             https: bool = False) -> str:
        """Fetch from the web server from client namespace ``i`` (through the tunnel);
        over HTTPS by the certificate's name (so the ClientHello carries an SNI)."""
        url = (f"https://{WEB_TLS_NAME}{path}" if https else f"http://{INTERNET_IP}{path}")
        resolve = ["-k", "--resolve", f"{WEB_TLS_NAME}:{WEB_TLS_PORT}:{INTERNET_IP}"] \
            if https else []
        proc = run(["curl", "-sS", "--fail", "-m", str(timeout), *resolve, *args, url],
                   self.client_ns(i), check=False)
        if proc.returncode != 0:
            raise RelayError(f"curl from {self.client_ns(i)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def access_log(self, *needles: str, timeout: float = 10) -> str:
        """nginx's access log once it holds every needle: nginx writes a line after
        the response has gone, so a client can be done before the line is there."""
        path = self.workdir / "access.log"
        wait_for(lambda: path.exists() and all(n in path.read_text() for n in needles),
                 timeout, f"nginx to log {needles}")
        return path.read_text()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def destroy(self) -> None:
        self.stop_all()
        for ns in reversed(self.namespaces):
            # Kill whatever a test left inside before deleting the namespace.
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def relay_command() -> list[str]:
    """The relay CLI of this installation (the venv's console script)."""
    return [sys.executable, "-m", "relay.cli"]


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RelayError(f"timed out after {timeout:.0f} s waiting for {what}")
