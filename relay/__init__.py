"""relay: a kernel-accelerated, packet-logging VPN relay."""

__version__ = "0.1.0"
