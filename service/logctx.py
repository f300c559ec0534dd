"""The log context: which request(s) a log line belongs to.

Every line the service writes ends with `request_id=<id>`: the id of the request being served (the API sets
it in the request's own task), of the requests whose jobs a worker has in hand (a batch: ids joined by
commas), or `-` for lines that belong to no request (startup, shutdown, Redis outages). A job carries its
request's id through the in-process queue and the Redis stream, so a worker's lines name the request that
caused them, on whatever host the worker runs.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

NO_REQUEST = "-"
REQUEST_ID = re.compile(r"[\w.:-]{1,64}", re.ASCII)  # a request id the API accepts from a client (fullmatch)
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("loragen_request_id", default=NO_REQUEST)
# the root logger (our own lines) and uvicorn's, which get their own handlers when uvicorn configures them
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


class RequestIdFormatter(logging.Formatter):
    """Wraps a handler's formatter: the first line of every record ends with `request_id=<id>`."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        first, nl, rest = text.partition("\n")
        return f"{first} request_id={request_id_var.get()}{nl}{rest}"


def tag_log_lines(loggers: Iterable[str] = LOGGERS) -> None:
    """Make every line of these loggers' handlers carry the request id. Idempotent; call it again after
    something (uvicorn's Config) installs new handlers."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler.formatter, RequestIdFormatter):
                handler.setFormatter(RequestIdFormatter(handler.formatter or logging.Formatter()))


@contextmanager
def serving(request_ids: Iterable[str]) -> Iterator[None]:
    """Log lines written inside belong to these requests (a worker's batch); restores the context after."""
    ids = dict.fromkeys(rid for rid in request_ids if rid and rid != NO_REQUEST)  # in order, once each
    token = request_id_var.set(",".join(ids) or NO_REQUEST)
    try:
        yield
    finally:
        request_id_var.reset(token)
