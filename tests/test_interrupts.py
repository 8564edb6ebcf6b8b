"""Ctrl-C while the main thread waits on a worker: the hand-over between them stays whole,
so the clean-up after the interrupt can still end the worker."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

from uvmkit.interrupts import Handoff, result_of


def _ctrl_c_in(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_while_waiting_for_room_leaves_the_handoff_working() -> None:
    handoff: Handoff[int | None] = Handoff(1)
    handoff.put(1)
    _ctrl_c_in(0.2)
    with pytest.raises(KeyboardInterrupt):
        handoff.put(2)  # no room: the worker has not started

    got: list[int | None] = []
    worker = threading.Thread(target=lambda: got.extend(iter(handoff.get, None)))
    worker.start()
    handoff.put_now(None)
    worker.join(timeout=5)

    assert not worker.is_alive()
    assert got == [1]


def test_handoff_keeps_order_and_bounds_what_waits() -> None:
    handoff: Handoff[int | None] = Handoff(3)
    for n in range(3):
        handoff.put(n)
    waiting = threading.Thread(target=handoff.put, args=(3,))
    waiting.start()
    time.sleep(0.1)
    assert waiting.is_alive()  # full: the fourth waits for room

    assert handoff.get() == 0
    waiting.join(timeout=5)
    handoff.put_now(None)
    assert list(iter(handoff.get, None)) == [1, 2, 3]


def test_ctrl_c_while_waiting_for_a_future_leaves_it_whole() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(time.sleep, 0.6)
        _ctrl_c_in(0.2)
        with pytest.raises(KeyboardInterrupt):
            result_of(future)
        # The worker finishes and hands its result over as if nothing had happened.
        assert result_of(future) is None
        assert future.done() and future.exception() is None
