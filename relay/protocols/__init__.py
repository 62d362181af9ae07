"""Wire protocols as sans-IO state machines: bytes in, events and bytes out.
Nothing here imports the rest of the relay."""
