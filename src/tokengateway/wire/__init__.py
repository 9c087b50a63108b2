"""What the LLM APIs say about tokens: `usage` reads the usage of each API dialect
(OpenAI chat/completions/embeddings, Responses, Anthropic Messages) from JSON bodies and SSE
streams, `tokens` counts and estimates tokens when an answer has none."""
