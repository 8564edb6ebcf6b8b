"""Ctrl-C and SIGTERM: unwind cleanly, and never in the middle of what must not be cut."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Generic, TypeVar

T = TypeVar("T")

# The signal that interrupted this process, once one has: SIGINT (Ctrl-C) or SIGTERM.
_received: list[int] = []


def exit_status() -> int:
    """A shell's status for the interruption: 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job's timeout, `kill`) unwinds like Ctrl-C, so every QEMU is killed,
    every container removed and every temporary file deleted."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; it is the one signals reach
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM off for the block; one that came is raised at its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        _received.append(caught[-1])
        raise KeyboardInterrupt


class Handoff(Generic[T]):
    """A bounded queue from the main thread to one worker thread that Ctrl-C cannot break.

    `queue.Queue` waits on a Condition written in Python: a KeyboardInterrupt that lands
    while the waiting thread takes its lock back leaves that lock released by the wrong
    thread, and the worker then dies or waits forever. Here every step is a single call
    into C (SimpleQueue), which either happens whole or not at all. Room is counted with
    tokens in a second SimpleQueue.
    """

    def __init__(self, room: int) -> None:
        self._items: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._room: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(room):
            self._room.put(None)

    def put(self, item: T) -> None:
        """Wait for room, then hand `item` over."""
        self._room.get()
        self._items.put(item)

    def put_now(self, item: T) -> None:
        """Hand `item` over at once, room or not: for the last item, which ends the work
        (also after a failure, when the worker may be far behind)."""
        self._items.put(item)

    def get(self) -> T:
        """The next item, waiting for one (the worker's side)."""
        item = self._items.get()
        self._room.put(None)
        return item


def result_of(future: concurrent.futures.Future[T]) -> T:
    """`future.result()`, waiting in C: a Ctrl-C while waiting leaves the future whole
    (its own wait is a Python Condition, which Ctrl-C can break; see Handoff)."""
    done: queue.SimpleQueue[None] = queue.SimpleQueue()
    future.add_done_callback(lambda _: done.put(None))
    done.get()
    return future.result()
