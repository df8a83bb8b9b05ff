"""OpenAI-compatible HTTP server: ``protocol`` (pydantic bodies), ``serving`` (endpoint logic), ``app`` (FastAPI
routes, auth, errors), ``metrics`` (Prometheus), ``cli`` (``nanoserve serve``)."""
