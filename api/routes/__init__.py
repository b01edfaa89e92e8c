"""Thin route modules; the work is in api.service and loom.jobs."""
