"""Processes: `serve` puts a gateway together and runs it (simulators for backends
included), `workers` runs `serve --workers N`'s followers, `process` is what both share."""
