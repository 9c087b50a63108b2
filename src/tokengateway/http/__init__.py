"""Our HTTP/1.1 server (`server`) and client (`client`) on httptools, request targets
(`target`) and the ASGI types they speak (`asgi`). Knows nothing of OpenAI or Kuadrant: it
imports nothing of tokengateway outside `http/` (tests/test_layers.py)."""
