"""The OpenAI-compatible HTTP server (`speckv serve`): an engine loop in its own thread,
continuous batching across HTTP requests, streaming, admission control and metrics."""
