"""Thin FastAPI routers over `service.serving`; `app.create_app` assembles them."""
