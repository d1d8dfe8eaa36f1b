"""OpenAI-compatible HTTP server over the engine (``atomq serve``; needs ``pip install atomq[serve]``).

    protocol.py     request / response bodies (pydantic)
    errors.py       errors with their HTTP status and OpenAI error type
    engine_loop.py  AsyncEngine: the engine in one thread, requests and deltas through the event loop
    serving.py      requests -> engine requests; deltas -> whole answers or server-sent events
    routes.py       the endpoints
    auth.py         Bearer API key middleware
    metrics.py      Prometheus metrics and the HTTP-counting middleware
    app.py          create_app(engine, model_name=...) -> FastAPI
    server.py       run_server: load a model and run uvicorn (the CLI's entry)

Nothing is imported here, so ``import atomq.serve`` works without FastAPI installed.
"""
