"""The request path: `app` runs the stages of one request top to bottom (route, auth,
limits, forward, usage, report); `body` reads JSON bodies, `errors` answers in OpenAI's
envelope, `ratelimit_headers` writes the x-ratelimit-* and Retry-After headers."""
