"""tokengateway: token-based rate limits for OpenAI-compatible LLM servers, configured by
Kuadrant's policy manifests."""

__version__ = "0.1.0"
__all__ = ["__version__"]
