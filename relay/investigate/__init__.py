"""Investigation: search over both logs, evidence bundles, pcapng export,
and their commands under ``relay logs``."""
