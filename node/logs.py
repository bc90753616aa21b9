"""Logging set-up for entry points (library code only calls ``getLogger``)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; keep its chatter (and any dataset dumps) out.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
