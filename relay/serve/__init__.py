"""``relay serve``: the core, the protocol links, sessions, the TAP device, NAT
and egress policy, abuse defences and the per-packet hot path."""
