"""The HTTP front end: OpenAI's completions API over the fused engine, with Prometheus metrics.

``app`` (routes), ``schemas`` (the request, checked field by field),
``service`` (the engine's side: accept, follow, cancel), ``completion`` (one
request's tokens becoming text), ``text`` (whole characters, stop strings),
``chunks`` (the JSON answered), ``errors``, ``metrics``, ``openapi``, and
``run`` (uvicorn with a graceful stop). ``flover serve`` puts them together.
"""
