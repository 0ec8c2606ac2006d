"""A request that waits for its answer only while its client is there: the client leaving cancels the work (so its
job leaves the queue, or its row leaves the step batch) and ends the request with ClientGone."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request as HttpRequest

DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while its request waited."""


async def unless_client_leaves(http: HttpRequest, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone (and `work` cancelled, so its job leaves the queue) if the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
