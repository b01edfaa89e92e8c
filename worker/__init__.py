"""Loom's worker: the Celery app (torch-free), thin tasks, and the batching engine.

This is the only package where ``loom`` (database, storage, media) and ``pipeline`` (the model)
meet. Importing ``worker`` or ``worker.app`` never imports torch; the model is loaded inside each
worker process after the fork (``worker_process_init``) or on first use by an embedded Engine.
"""
