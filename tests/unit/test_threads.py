"""The hub's threadpool as sessions use it: first come, first served."""

from __future__ import annotations

import threading

import gevent
import gevent.socket
import pytest

from geosmtp.server.threads import FairSlots, in_thread


def test_a_freed_slot_goes_to_the_longest_waiter_not_to_a_newcomer():
    slots = FairSlots(gevent.get_hub(), size=1)
    got: list[str] = []

    def take(name: str) -> None:
        slots.acquire()
        got.append(name)

    slots.acquire()  # the one slot is busy
    first = gevent.spawn(take, "first")
    second = gevent.spawn(take, "second")
    gevent.idle()
    assert list(slots.waiting) and got == []  # both queued
    slots.release()
    # A newcomer that asks before the waiters have run (what gevent's Semaphore
    # gives it: the freed count) queues behind them instead.
    newcomer = gevent.spawn(take, "newcomer")
    first.join(timeout=5)
    assert got == ["first"]
    slots.release()
    second.join(timeout=5)
    slots.release()
    newcomer.join(timeout=5)
    assert got == ["first", "second", "newcomer"]
    slots.release()
    assert slots.busy == 0 and not slots.waiting


def test_a_killed_waiter_leaves_the_queue_and_a_handed_slot_passes_on():
    slots = FairSlots(gevent.get_hub(), size=1)
    got: list[str] = []

    def take(name: str) -> None:
        slots.acquire()
        got.append(name)

    slots.acquire()
    gone = gevent.spawn(take, "gone")
    handed = gevent.spawn(take, "handed")
    last = gevent.spawn(take, "last")
    gevent.idle()
    gone.kill()  # never had a slot: it just leaves
    assert len(slots.waiting) == 2
    handed.kill(block=False)  # the kill is on its way...
    slots.release()  # ...when the slot is handed to it: it passes it on
    last.join(timeout=5)
    assert handed.dead and isinstance(handed.value, gevent.GreenletExit)
    assert got == ["last"]
    assert slots.busy == 1 and not slots.waiting
    slots.release()
    assert slots.busy == 0


@pytest.fixture
def one_thread():
    pool = gevent.get_hub().threadpool
    size = pool.maxsize
    pool.maxsize = 1
    yield
    pool.maxsize = size


def test_in_thread_runs_jobs_in_the_order_they_were_asked_for(one_thread):
    order: list[int] = []
    started, release = threading.Event(), threading.Event()

    def job(n: int) -> int:
        if n == 0:
            started.set()
            release.wait(10)
        order.append(n)
        return n

    greenlets = [gevent.spawn(in_thread, job, 0)]
    gevent.idle()
    assert started.wait(5)
    greenlets += [gevent.spawn(in_thread, job, n) for n in range(1, 6)]
    gevent.idle()  # all five wait for the one thread
    release.set()
    gevent.joinall(greenlets, timeout=10)
    assert [g.value for g in greenlets] == list(range(6))
    assert order == list(range(6))


def test_a_session_woken_by_its_socket_does_not_overtake_the_waiters(one_thread):
    """What a session whose final dot arrives as a job ends does: it asks for a
    thread in the same turn of the loop in which the job's slot came free,
    before the waiters were told. It queues behind them."""
    order: list[str] = []
    started, release = threading.Event(), threading.Event()
    reader, writer = gevent.socket.socketpair()

    def job(name: str) -> None:
        if name == "first":
            started.set()
            release.wait(10)
            writer.send(b".")  # the newcomer's socket gets ready as this job ends
        order.append(name)

    def newcomer() -> None:
        reader.recv(1)
        in_thread(job, "newcomer")

    try:
        late = gevent.spawn(newcomer)
        greenlets = [gevent.spawn(in_thread, job, "first")]
        gevent.idle()
        assert started.wait(5)
        greenlets += [gevent.spawn(in_thread, job, f"waiter{n}") for n in range(3)]
        gevent.idle()
        release.set()
        gevent.joinall([*greenlets, late], timeout=10)
        assert order == ["first", "waiter0", "waiter1", "waiter2", "newcomer"]
    finally:
        reader.close()
        writer.close()


def test_an_error_in_the_thread_is_raised_in_the_caller_alone(monkeypatch):
    """The caller gets the exception, with its traceback; the hub reports
    nothing (gevent's pool logged each as an "unhandled error")."""
    reported: list = []
    monkeypatch.setattr(gevent.get_hub(), "print_exception", lambda *a: reported.append(a))

    def full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        in_thread(full)
    assert info.value.errno == 28
    assert info.traceback[-1].name == "full"
    assert in_thread(lambda: 7) == 7
    gevent.sleep(0.05)
    assert reported == []
