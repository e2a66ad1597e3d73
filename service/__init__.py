"""The HTTP image-generation service (FastAPI + queue + workers)."""
