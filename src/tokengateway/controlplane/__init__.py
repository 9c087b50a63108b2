"""What changes the configuration while the gateway serves: `control` (apply,
delete, file reloads, the saved state) and `admin` (the admin API: resources, counters,
metrics, the usage page)."""
