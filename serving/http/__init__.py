"""The OpenAI-compatible server's steering additions (used in vLLM's API-server process):
``app`` installs them into vLLM's FastAPI app, ``request_fields`` reads the ``steering``
request field, ``middleware`` adds response headers / admin auth / metrics pulls,
``vector_routes`` serves the registry, ``state`` and ``config`` hold what they share."""
