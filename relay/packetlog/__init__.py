"""The packet log: eBPF capture on the TAP device, its tc filters, the
segment files and their block codec, retention, and logging control."""
