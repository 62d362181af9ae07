"""The connection log: its day files, retention, and shipping to the collector."""
