-- wrk script: a non-streaming chat completion through the tutorial's route, as the gold user.
-- BENCH_AUTH overrides the Authorization header (the LiteLLM scenario uses its own key),
-- BENCH_HOST the Host header.
wrk.method = "POST"
wrk.headers["Host"] = os.getenv("BENCH_HOST") or "trlp-tutorial.example.com"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH") or "APIKEY iamagolduser"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "meta-llama/Llama-3.1-8B-Instruct", '
  .. '"messages": [{"role": "user", "content": "What is Kubernetes?"}], '
  .. '"max_tokens": 20, "stream": false}'
