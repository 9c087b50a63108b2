"""What the gateway tells about itself: `metrics` (Prometheus), `accesslog` (one
JSON line per request), `ui` (the usage page)."""
