"""Keep library chatter off the console without hiding failures."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def held_output() -> Iterator[None]:
    """Run a block with ``sys.stdout``/``sys.stderr`` captured and dropped, unless the block raises: then the
    captured text goes to stderr before the exception, so a real error keeps its context.

    For library calls that print status lines and progress bars on every rank (DeepSpeed's zero_to_fp32 when
    BFT starts from an MGP checkpoint).
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
