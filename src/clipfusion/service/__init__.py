"""``clipfusion serve``: the inspection service (FastAPI on uvicorn) with its database, dynamic
batching, operator page and metrics.  ``create_app(settings)`` builds the application."""
