"""The provider side: calling an OpenAI-compatible API, decoding its event stream and dialects; the demo model."""
