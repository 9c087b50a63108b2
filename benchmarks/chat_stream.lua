-- wrk script: a streaming chat completion ("stream": true) through the tutorial's route, as
-- the gold user. The gateway adds stream_options.include_usage upstream and hides the usage
-- chunk again from the client. BENCH_AUTH / BENCH_HOST override the headers, as in chat.lua.
wrk.method = "POST"
wrk.headers["Host"] = os.getenv("BENCH_HOST") or "trlp-tutorial.example.com"
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH") or "APIKEY iamagolduser"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "meta-llama/Llama-3.1-8B-Instruct", '
  .. '"messages": [{"role": "user", "content": "What is Kubernetes?"}], '
  .. '"max_tokens": 20, "stream": true}'
