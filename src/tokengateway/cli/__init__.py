"""The `tokengateway` command: `main` (serve, validate, sim, demo), `kubectl` (apply, get,
delete, counters against the admin API), `top`, `demo`."""
