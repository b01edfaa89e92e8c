"""Imported last by the forkserver of the embedded engine processes (worker.embedded._PRELOAD).

The server only imports and forks; when its parent exits, it raises SystemExit, and the
interpreter's teardown of a process that imported torch took over a second, during which the
server still held the command's stdout and stderr open (a caller reading them to the end, as
scripts and ``subprocess.run`` do, waited for it). This makes the server's exit immediate: it
holds no state to flush. The engine processes forked from it never run these handlers: a forked
process exits with ``os._exit``.
"""

import atexit
import os

atexit.register(os._exit, 0)
