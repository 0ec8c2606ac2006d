"""The production server: `python -m engine.serve` (FastAPI + uvicorn; Ray Serve for scale-out).

config.py   ServeConfig: every server default, in one place (the CLI reads it)
schemas.py  request/response bodies (pydantic) and their conversion to `engine.request.Request`
batcher.py  the bounded queue and the dynamic batcher (one UNet batch per compatible group)
metrics.py  Prometheus metrics (Triton's names where the concept matches)
app.py      the ASGI app: routes, errors, body limit, warm-up, drain
ray_app.py  the same app as a Ray Serve deployment
"""
