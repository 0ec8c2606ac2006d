"""The error a request's bad value raises: it names the request field, so the server answers a 400 whose `param`
is that field and the CLI names its flag, without either parsing message text."""
from __future__ import annotations


class RequestError(ValueError):
    """A request field holds a value this engine cannot run; `field` is the Request field's name."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")  # files that run code when loaded: refused
