"""What native code (TensorFlow's and the converters' C++) writes straight to the file descriptors 1 and 2,
which Python's own ``sys.stdout``/``sys.stderr`` redirection does not reach."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Sequence


@dataclass
class Captured:
    text: str = ""  # what was written, once the block has ended


@contextlib.contextmanager
def captured(fds: Sequence[int] = (1, 2)) -> Iterator[Captured]:
    """Send the file descriptors ``fds`` to a temporary file for the block; the yielded ``Captured`` holds what
    was written once the block ends (normally or not). The descriptors are restored either way."""
    result = Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = {fd: os.dup(fd) for fd in fds}
        try:
            for fd in saved:
                os.dup2(held.fileno(), fd)
            yield result
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            held.seek(0)
            result.text = held.read().decode(errors="replace")
