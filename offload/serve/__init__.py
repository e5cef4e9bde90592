"""Serving a loaded model: the OpenAI-compatible HTTP server (`app`, `engine`) and the terminal chat (`chat`),
both over one Runtime whose KV cache carries a conversation from turn to turn (prefix reuse).

    completion.py  one generation as text: stop strings, cancellation, finish reason, counts
    engine.py      one generation at a time for the server: a bounded queue and a worker thread
    schema.py      the OpenAI request and response bodies (pydantic)
    app.py         the HTTP routes, errors, auth and `serve()` (uvicorn)
    metrics.py     the counters behind GET /metrics (Prometheus text)
    chat.py        `moe-offload chat`: the interactive terminal chat
"""
