"""Loom's model package: pure PyTorch + Pillow, no queues, databases or storage.

Kept import-light on purpose: `import pipeline` must not pull torch in; use
`pipeline.registry.load(...)` to get a serving model.
"""
