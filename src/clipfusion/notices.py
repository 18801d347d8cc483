"""Messages said once per process, however often their cause recurs: a model file read by every
batcher and worker, a precision fallback met by every detector of an evaluation."""
from __future__ import annotations

import logging

_said: set[tuple[str, str]] = set()


def say_once(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` at ``level`` unless this logger has said it already in this process."""
    key = (logger.name, message)
    if key not in _said:
        _said.add(key)
        logger.log(level, message)
