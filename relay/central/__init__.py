"""The network's central side: the collector of every relay's connection log."""
