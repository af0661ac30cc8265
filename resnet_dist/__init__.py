"""resnet_dist: a distributed trainer of the classic ResNet-18 on Fashion-MNIST (README.md: the commands).

One console for the whole package (torchtitan's tools/logging.py is the model): every module logs to
`logging.getLogger(__name__)`; INFO lines go to stdout as they are, warnings and errors to stderr as `warning: ...`
and `error: ...`. Entry points call `cli.setup_logging(is_main)` once the rank is known: the other ranks then say
only their errors.
"""

import logging
import sys

__version__ = "0.1.0"


class Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        elif record.levelno >= logging.WARNING:
            print(f"warning: {msg}", file=sys.stderr, flush=True)
        else:
            print(msg, flush=True)


LOG = logging.getLogger(__name__)
LOG.addHandler(Console())
LOG.setLevel(logging.INFO)
LOG.propagate = False
