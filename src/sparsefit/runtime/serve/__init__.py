"""`sparsefit serve`: an OpenAI-compatible HTTP server over the runtime's continuous batching.

`server.run_server(spec, options)` binds the socket first (a port in use fails before the model loads),
packs the model, sizes the KV cache (`max_batch` slots of `max_model_len` tokens, checked against
free memory before it is allocated), and serves the FastAPI app (`app.py`) with uvicorn until
SIGTERM or Ctrl-C: then it stops accepting, gives in-flight requests `shutdown_timeout` seconds,
cancels the rest, and returns (exit 0).
"""
