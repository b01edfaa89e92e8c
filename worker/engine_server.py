"""Imported last by the forkserver of the embedded engine processes (worker.embedded._PRELOAD).

The server only imports and forks; when its parent exits, it raises SystemExit, and the
interpreter's teardown of a process that imported torch took over a second, during which the
server still held the command's stdout and stderr open (a caller reading them to the end, as
scripts and ``subprocess.run`` do, waited for it). This makes the server's exit immediate: it
holds no state to flush. The engine processes forked from it never run these handlers: a forked
process exits with ``os._exit``.

It also does, once, what each engine process would otherwise repeat after its fork on the way to
its first claim (0.15-0.35 s of each process's CPU, measured from fork to first claim): the ORM's
mapper configuration, which the first query triggers, and loading the image plugins.
"""

import atexit
import os

atexit.register(os._exit, 0)

# The warm-up described above.
from PIL import Image  # noqa: E402
from sqlalchemy.orm import configure_mappers  # noqa: E402

import loom.media  # noqa: E402, F401
import loom.models  # noqa: E402, F401
import pipeline.checkpoint  # noqa: E402, F401

configure_mappers()
Image.init()
