"""SharedState across real processes: os.fork() children, as the master makes its workers."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import ClassVar

import gevent
import gevent.lock
import pytest

from geosmtp.auth import BUSY, AuthThrottle, LocalThrottleRecords, ThrottleRecord
from geosmtp.logins import Logins
from geosmtp.protocol.sasl import Credentials
from geosmtp.server import shared
from geosmtp.server.host import Login
from geosmtp.server.listeners import Listeners
from geosmtp.server.protocols import Protocols, ServerProtocol
from geosmtp.server.shared import LocalConnections, SharedState, SharedThrottleRecords

WAIT = 10.0  # seconds a child gets before the test calls it stuck


class Child:
    """A forked process running `fn`; what it returns comes back as JSON."""

    started: ClassVar[list[Child]] = []  # killed at the end of each test, if still there

    def __init__(self, fn: Callable[[], object]) -> None:
        read, write = os.pipe()
        self.started.append(self)
        self.pid = os.fork()
        if self.pid == 0:  # the child: never back into pytest
            code = 1
            try:
                os.close(read)
                result = json.dumps(fn()).encode()
                os.write(write, result)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        self._pipe = read
        self.status: int | None = None

    def poll(self) -> bool:
        """Whether it has ended (reaped)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is not None

    def wait(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"child {self.pid} still runs after {timeout}s")
            time.sleep(0.005)  # polling a child's exit: nothing to wait on

    def result(self) -> object:
        self.wait()
        assert os.waitstatus_to_exitcode(self.status) == 0, "the child failed (see stderr)"
        with os.fdopen(self._pipe, "rb") as pipe:
            self._pipe = -1
            return json.loads(pipe.read())

    def kill(self) -> None:
        if not self.poll():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -signal.SIGKILL
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1


@pytest.fixture(autouse=True)
def no_child_left():
    yield
    while Child.started:
        Child.started.pop().kill()


class Barrier:
    """Children block in `wait()` until the parent calls `release()`, so they start together."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    def wait(self) -> None:
        os.close(self._write)
        os.read(self._read, 1)  # b"" once the parent closes its end

    def release(self) -> None:
        os.close(self._write)
        os.close(self._read)


class Signal:
    """A child says "ready" (one byte) and the parent waits for it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    def send(self) -> None:
        os.write(self._write, b"!")

    def wait(self) -> None:
        try:
            assert os.read(self._read, 1) == b"!", "the child ended before it was ready"
        finally:
            os.close(self._read)
            os.close(self._write)


def lock_is_free(state: SharedState) -> bool:
    """Whether this process can take the lock now (taken and released if so)."""
    try:
        fcntl.lockf(state.memory.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        assert exc.errno in (errno.EACCES, errno.EAGAIN)
        return False
    fcntl.lockf(state.memory.fd, fcntl.LOCK_UN)
    return True


def wait_until_blocked_on_a_lock(pid: int) -> None:
    """Poll until `pid` sleeps in the kernel's record-lock wait (where the
    kernel hides the function a process sleeps in, `wchan` reads "0": only
    that it sleeps is checked)."""
    deadline = time.monotonic() + WAIT
    while True:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        if state == "S" and ("lock" in wchan or "setlk" in wchan or wchan == "0"):
            return
        assert time.monotonic() < deadline, f"{pid} is not waiting for a lock ({state} {wchan})"
        time.sleep(0.005)


@pytest.fixture
def state():
    state = SharedState(slots=4, max_tracked=64, clients_tracked=64)
    yield state
    state.close()


# ------------------------------------------------------------ the lock


def test_the_lock_on_the_inherited_descriptor_is_each_processs_own(state):
    state.memory.lock()
    try:
        assert Child(lambda: lock_is_free(state)).result() is False  # the parent's lock excludes
    finally:
        state.memory.unlock()
    assert Child(lambda: lock_is_free(state)).result() is True


def test_a_worker_killed_while_holding_the_lock_does_not_block_the_others(state):
    holding = Signal()

    def hold() -> None:
        state.memory.lock()
        holding.send()
        signal.pause()  # until killed

    holder = Child(hold)
    holding.wait()
    assert not lock_is_free(state)

    def open_one() -> bool:
        state.bind(1)
        return state.try_open(10)

    waiter = Child(open_one)
    wait_until_blocked_on_a_lock(waiter.pid)
    assert not waiter.poll()
    holder.kill()
    assert waiter.result() is True  # got the lock once the holder died
    assert lock_is_free(state)
    assert state.total() == 1 and state.count(1) == 1


# --------------------------------------------------------- the connections


def test_four_workers_share_the_cap_exactly(state):
    start = Barrier()

    def worker(slot: int) -> Callable[[], int]:
        def run() -> int:
            state.bind(slot)
            start.wait()
            return sum(state.try_open(150) for _ in range(100))

        return run

    children = [Child(worker(slot)) for slot in range(4)]
    start.release()
    opened = [child.result() for child in children]
    assert sum(opened) == 150
    assert state.total() == 150
    assert [state.count(slot) for slot in range(4)] == opened


def test_workers_opening_and_closing_at_the_cap_never_pass_it(state):
    start = Barrier()

    def worker(slot: int) -> Callable[[], list[int]]:
        def run() -> list[int]:
            state.bind(slot)
            start.wait()
            held = seen_over = 0
            for _ in range(20_000):  # 4 x 60 wanted, 150 allowed: at the cap most of the time
                if held < 60 and state.try_open(150):
                    held += 1
                    seen_over += state.total() > 150
                elif held:
                    state.closed()
                    held -= 1
            return [held, seen_over]

        return run

    children = [Child(worker(slot)) for slot in range(4)]
    start.release()
    results = [child.result() for child in children]
    assert [over for _, over in results] == [0, 0, 0, 0]
    assert sum(held for held, _ in results) == state.total() <= 150


def test_a_closed_connection_gives_its_place_back(state):
    state.bind(2)
    assert [state.try_open(2) for _ in range(3)] == [True, True, False]
    state.closed()
    assert state.total() == 1 and state.count(2) == 1
    assert state.try_open(2) is True
    assert state.try_open(2) is False


def test_reset_slot_forgets_what_a_killed_worker_had_open(state):
    opened = Signal()

    def open_three() -> None:
        state.bind(3)
        for _ in range(3):
            assert state.try_open(100)
        opened.send()
        signal.pause()  # until killed, never closing them

    worker = Child(open_three)
    opened.wait()
    worker.kill()
    state.bind(0)
    assert state.total() == 3
    assert state.try_open(3) is False  # the dead worker's count holds the places
    state.reset_slot(3)
    assert state.total() == 0
    assert state.try_open(3) is True


def test_a_slot_must_be_bound_and_in_range(state):
    with pytest.raises(RuntimeError):
        state.try_open(10)
    with pytest.raises(ValueError):
        state.bind(4)
    assert state.total() == 0


def test_the_in_process_counter_has_the_same_behaviour():
    counter = LocalConnections()
    assert [counter.try_open(2) for _ in range(3)] == [True, True, False]
    counter.closed()
    assert counter.total() == 1 and counter.try_open(2) is True


class Tally:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


#: An app's per-client limits that count nobody (these tests are about the cap).
#: A listener without the PROXY protocol (issue 22), as the handler reads it.
PLAIN_LISTENER = SimpleNamespace(proxy_protocol=False, proxy_trusted=[])
NO_CLIENT_LIMITS = SimpleNamespace(
    connect=lambda peer, smtp: (0, None), disconnect=lambda key: None
)


def test_the_listeners_cap_counts_the_connections_of_the_other_workers(state):
    def hold_two() -> None:
        state.bind(1)
        assert state.try_open(10) and state.try_open(10)  # and never closes them

    Child(hold_two).result()
    state.bind(0)
    app = SimpleNamespace(config=SimpleNamespace(max_clients=3), anvil=NO_CLIENT_LIMITS)
    listeners = Listeners(app, Protocols(), connections=state)
    lm = SimpleNamespace(refused=Tally(), connections=Tally(), current=Tally())
    seen = {}

    class FakeSession:
        PROTOCOL = "smtp"

        def __init__(self, app, sock, address, listener, lm, client_key) -> None:
            self.id, self.peer = f"s{address[1]}", address[0]

        @staticmethod
        def refusal(stopping: bool) -> bytes:
            return b"421 busy\r\n"

        def run(self) -> None:  # the third place: the next client is over the cap
            seen["total"] = state.total()
            ours, theirs = socket.socketpair()
            with ours, theirs:
                handle(ours, ("192.0.2.2", 2))
                seen["refusal"] = theirs.recv(100)

    smtp = ServerProtocol("smtp", ("mx",), FakeSession, build=lambda *a: None)  # type: ignore[arg-type]
    handle = listeners._handler(smtp, PLAIN_LISTENER, lm)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        gevent.spawn(handle, ours, ("192.0.2.1", 1)).get(timeout=WAIT)
    assert seen == {"total": 3, "refusal": b"421 busy\r\n"}
    assert (lm.connections.value, lm.refused.value, lm.current.value) == (1, 1, 0)
    assert state.count(0) == 0 and state.total() == 2  # ours closed, theirs held


def test_a_session_that_fails_to_start_gives_its_place_back(state):
    state.bind(0)
    app = SimpleNamespace(config=SimpleNamespace(max_clients=3), anvil=NO_CLIENT_LIMITS)
    listeners = Listeners(app, Protocols(), connections=state)

    class Broken:
        PROTOCOL = "smtp"

        def __init__(self, *args) -> None:
            raise RuntimeError("broken")

    smtp = ServerProtocol("smtp", ("mx",), Broken, build=lambda *a: None)  # type: ignore[arg-type]
    handle = listeners._handler(smtp, PLAIN_LISTENER, None)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(RuntimeError):
        gevent.spawn(handle, ours, ("192.0.2.1", 1)).get(timeout=WAIT)
    assert state.total() == 0


# ------------------------------------------------------------- the throttle


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def throttle(state: SharedState, clock: Clock | None = None, **settings) -> AuthThrottle:
    settings = {"max_failures": 4, "base_delay": 1.0, **settings}
    return AuthThrottle(**settings, clock=clock or time.monotonic, records=state.throttle_records)


def fail(t: AuthThrottle, address: str) -> tuple[float, bool] | None:
    attempt = t.reserve(address)
    assert attempt != BUSY
    return None if attempt is None else t.failed(address, attempt)


def test_failures_in_two_workers_add_up_to_the_limit(state):
    def two_failures() -> list:
        t = throttle(state)
        return [fail(t, "192.0.2.1"), fail(t, "2001:db8::1")]

    assert Child(two_failures).result() == [[1.0, False], [1.0, False]]
    assert Child(two_failures).result() == [[2.0, False], [2.0, False]]

    def two_more() -> list:
        t = throttle(state)
        return [fail(t, "192.0.2.1"), fail(t, "192.0.2.1"), t.reserve("192.0.2.1")]

    assert Child(two_more).result() == [[4.0, False], [8.0, True], None]
    t = throttle(state)
    assert t.reserve("192.0.2.1") is None  # blocked here too
    assert t.reserve("2001:db8::abcd") == 3  # its /64 had two failures


def test_parallel_guesses_from_four_workers_get_max_failures_checks_between_them(state):
    start = Barrier()

    def guess() -> int:
        t = throttle(state, max_failures=5)
        start.wait()
        checks = 0
        while (attempt := t.reserve("192.0.2.7")) is not None:
            if attempt != BUSY:  # a check "runs", and fails
                checks += 1
                t.failed("192.0.2.7", attempt)
        return checks

    children = [Child(guess) for _ in range(4)]
    start.release()
    assert sum(child.result() for child in children) == 5


def test_a_success_in_one_worker_clears_the_failures_of_the_others(state):
    def three_failures() -> None:
        t = throttle(state)
        for _ in range(3):
            fail(t, "192.0.2.1")

    Child(three_failures).result()
    t = throttle(state)
    assert t.reserve("192.0.2.1") == 4
    Child(lambda: throttle(state).succeeded("192.0.2.1")).result()
    assert len(t) == 0


def test_expired_records_are_forgotten_across_workers(state):
    def block_at_1000() -> None:
        t = throttle(state, Clock(1000.0))
        for _ in range(4):
            fail(t, "192.0.2.1")

    Child(block_at_1000).result()
    clock = Clock(1600.0)
    t = throttle(state, clock)
    assert t.reserve("192.0.2.1") is None  # 600 s after the last failure: still in the window
    clock.now = 1600.5
    assert t.reserve("192.0.2.1") == 1  # expired: counting starts again
    assert len(t) == 1


def test_the_shared_table_is_bounded_and_forgets_the_least_recently_seen(state):
    def spray() -> int:
        t = throttle(state)
        most = 0
        for i in range(1000):
            fail(t, f"10.0.{i // 256}.{i % 256}")
            most = max(most, len(t))
        return most

    assert Child(spray).result() == 64
    t = throttle(state)
    assert len(t) == 64
    assert t.reserve("10.0.3.231") == 2  # number 999, one of the last 64: remembered
    assert t.reserve("10.0.3.168") == 2  # number 936, the oldest of them
    assert t.reserve("10.0.0.0") == 1  # the first: forgotten
    assert len(t) == 64


def test_a_worker_killed_half_way_through_a_change_leaves_a_usable_table(state):
    t = throttle(state)
    for _ in range(3):
        fail(t, "192.0.2.1")
    inside = Signal()

    def die_inside() -> None:
        with state.throttle_records.locked():
            inside.send()
            signal.pause()  # until killed

    child = Child(die_inside)
    inside.wait()
    child.kill()
    # The table may be half-changed: it is started afresh, once.
    assert len(t) == 0
    assert t.reserve("192.0.2.1") == 1
    assert fail(t, "192.0.2.2") == (1.0, False)
    assert len(t) == 2


def test_a_login_waiting_on_another_workers_checks_asks_again_without_a_pulse(state):
    reserved, go = Signal(), Signal()

    def three_running_checks() -> None:
        t = throttle(state, max_failures=3)
        assert [t.reserve("192.0.2.1") for _ in range(3)] == [1, 2, 3]
        reserved.send()
        go.wait()
        t.succeeded("192.0.2.1")  # one ends: no pulse reaches the parent

    child = Child(three_running_checks)
    reserved.wait()
    metrics = SimpleNamespace(auth_success=Tally(), auth_failure=Tally())
    logins = Logins(metrics, lambda fn, *args: fn(*args), records=state.throttle_records)
    logins.throttle.max_failures = 3
    logins.timeout = 60.0
    logins.users = SimpleNamespace(verify=lambda login, password: "alice")
    credentials = Credentials("PLAIN", "alice", "secret")
    login = gevent.spawn(logins.check, "s1", "192.0.2.1", credentials)
    gevent.sleep(0)  # it starts, and waits: BUSY
    assert logins.throttle.reserve("192.0.2.1") == BUSY and not login.ready()
    go.send()
    # Well before the command timeout (60 s) and with no pulse: it asked again.
    assert login.get(timeout=WAIT) == Login("alice")
    child.result()


# ------------------------------------------------ the table, against a model


def same_home_slots(key: str) -> int:
    """Distinct hashes, few home slots (two of them at the end of the index,
    so that probe chains wrap around)."""
    n = int(key)
    return n << 8 | (12 + n % 6)


@pytest.mark.parametrize("hashing", [shared.key_hash, same_home_slots])
def test_the_shared_table_does_what_the_in_process_one_does(monkeypatch, hashing):
    monkeypatch.setattr(shared, "key_hash", hashing)
    state = SharedState(slots=1, max_tracked=8)  # an index of 16 slots
    table, model = state.throttle_records, LocalThrottleRecords(max_tracked=8)
    rng = random.Random(17)
    keys = [str(n) for n in range(1, 25)]
    with table.locked():
        for step in range(20_000):
            key = rng.choice(keys)
            op = rng.random()
            known = model.get(key) is not None
            if op < 0.45:
                table.put(key, ThrottleRecord(step, float(step), step % 3))
                model.put(key, ThrottleRecord(step, float(step), step % 3))
            elif op < 0.65 and known:
                table.touch(key)
                model.touch(key)
            elif op < 0.85 and known:
                table.delete(key)
                model.delete(key)
            assert len(table) == len(model)
            assert table.get(key) == model.get(key)
            if step % 97 == 0:
                assert [table.get(k) for k in keys] == [model.get(k) for k in keys]
        # The order of eviction is the model's: fill with new keys, one at a time.
        for n in range(100, 108):
            table.put(str(n), ThrottleRecord(n, 0.0))
            model.put(str(n), ThrottleRecord(n, 0.0))
            assert [table.get(k) for k in keys] == [model.get(k) for k in keys]
    state.close()


def test_the_table_needs_a_place_for_one_record():
    with pytest.raises(ValueError):
        SharedState(slots=1, max_tracked=0)
    assert SharedThrottleRecords.size(100_000) < 8 << 20


# ------------------------------------------------------- per-client limits

ERR_WINDOW = 600.0


def connect(table, h: int, now: float = 0.0, **limits) -> tuple:
    settings = {"max_connections": 0, "connection_rate": 0, "max_errors": 0, **limits}
    return table.connect(
        h,
        now,
        settings["max_connections"],
        settings["connection_rate"],
        settings["max_errors"],
        ERR_WINDOW,
    )


def test_open_connections_per_client_are_exact_across_four_workers(state):
    table = state.clients
    start = Barrier()

    def grab() -> int:
        start.wait()
        return sum(connect(table, 7, max_connections=5) == (None, False) for _ in range(10))

    children = [Child(grab) for _ in range(4)]
    start.release()
    assert sum(c.result() for c in children) == 5  # type: ignore[misc]
    assert table.get(7).connections == 5
    assert connect(table, 7, max_connections=5) == (shared.CONNECTIONS, False)  # logged once
    table.disconnect(7)
    assert connect(table, 7, max_connections=5) == (None, False)  # the place given back
    assert connect(table, 8, max_connections=5) == (None, False)  # another client's own


def test_a_refusal_is_news_once_per_window():
    table = shared.SharedClientTable.private(16)
    assert [connect(table, 1, 1.0, connection_rate=2)[0] for _ in range(2)] == [None, None]
    assert connect(table, 1, 2.0, connection_rate=2) == (shared.CONNECTION_RATE, True)
    assert connect(table, 1, 3.0, connection_rate=2) == (shared.CONNECTION_RATE, False)
    assert table.count(1, shared.MESSAGE_RATE, 3.0, 1) == (True, False)
    assert table.count(1, shared.MESSAGE_RATE, 3.0, 1) == (False, True)
    assert table.count(1, shared.MESSAGE_RATE, 3.0, 1) == (False, False)
    assert table.count(1, shared.RECIPIENT_RATE, 3.0, 1) == (True, False)  # counted apart
    # The minute is over: the counts start again, and a refusal is news again.
    later = 1.0 + shared.RATE_WINDOW
    assert [connect(table, 1, later, connection_rate=2)[0] for _ in range(3)] == [
        None,
        None,
        shared.CONNECTION_RATE,
    ]
    assert connect(table, 1, later, connection_rate=2)[1] is False
    assert table.count(1, shared.MESSAGE_RATE, later, 1) == (True, False)
    assert table.count(1, shared.MESSAGE_RATE, later, 1) == (False, True)


def test_the_error_budget_lasts_its_window():
    table = shared.SharedClientTable.private(16)
    assert table.add_errors(3, 4, 10.0, 5, ERR_WINDOW) == (False, False)
    assert connect(table, 3, 11.0, max_errors=5) == (None, False)
    assert table.add_errors(3, 1, 12.0, 5, ERR_WINDOW) == (True, True)
    assert table.add_errors(3, 1, 13.0, 5, ERR_WINDOW) == (True, False)
    assert connect(table, 3, 14.0, max_errors=5) == (shared.ERRORS, False)
    # The minute's window rolls over; the error window does not.
    assert connect(table, 3, 10.0 + shared.RATE_WINDOW, max_errors=5)[0] == shared.ERRORS
    assert connect(table, 3, 10.0 + ERR_WINDOW, max_errors=5) == (None, False)
    assert table.get(3).errors == 0


def test_a_client_with_open_connections_is_never_evicted():
    table = shared.SharedClientTable.private(4)
    assert connect(table, 1, max_connections=1) == (None, False)
    assert table.add_errors(2, 3, 0.0, 100, ERR_WINDOW) == (False, False)
    for h in range(100, 200):  # a spray of strangers, each connecting and leaving
        assert connect(table, h, max_connections=1) == (None, False)
        table.disconnect(h)
    assert len(table) == 4
    assert connect(table, 1, max_connections=1) == (shared.CONNECTIONS, True)  # still held
    assert table.get(2) is None  # the least recently seen, with nothing open: forgotten
    table.disconnect(1)
    assert connect(table, 1, max_connections=1) == (None, False)


def test_a_full_table_of_open_connections_admits_a_new_client_uncounted():
    table = shared.SharedClientTable.private(2)
    assert connect(table, 1, max_connections=1)[0] is None
    assert connect(table, 2, max_connections=1)[0] is None
    assert connect(table, 3, max_connections=1) == (None, False)  # no room: not counted
    assert table.get(3) is None
    table.disconnect(3)  # harmless
    assert table.get(1).connections == table.get(2).connections == 1


def test_a_recently_seen_client_outlasts_older_ones():
    table = shared.SharedClientTable.private(3)
    for h in (1, 2, 3):
        table.add_errors(h, 1, 0.0, 100, ERR_WINDOW)
    table.count(1, shared.MESSAGE_RATE, 0.0, 100)  # 1 is seen again: 2 is the oldest now
    table.add_errors(4, 1, 0.0, 100, ERR_WINDOW)
    assert [table.get(h) is not None for h in (1, 2, 3, 4)] == [True, False, True, True]


def test_forget_open_after_a_worker_died_with_connections(state):
    table = state.clients

    def hold_and_die() -> None:
        for _ in range(3):
            assert connect(table, 9, max_connections=3)[0] is None
        os._exit(0)  # as if killed: never disconnects

    Child(hold_and_die).wait()
    assert connect(table, 9, max_connections=3)[0] == shared.CONNECTIONS
    table.forget_open()
    assert table.get(9).connections == 0
    assert connect(table, 9, max_connections=3)[0] is None
    table.disconnect(9)
    for h in range(1000, 1064):  # it is back on the list: evictable like any other
        table.add_errors(h, 1, 0.0, 100, ERR_WINDOW)
    assert table.get(9) is None


def test_a_worker_killed_inside_the_client_table_leaves_it_usable(state):
    table = state.clients
    assert connect(table, 5, max_connections=1)[0] is None
    inside = Signal()

    def die_inside() -> None:
        with table.locked():
            inside.send()
            signal.pause()

    child = Child(die_inside)
    inside.wait()
    child.kill()
    assert connect(table, 5, max_connections=1) == (None, False)  # started afresh
    table.disconnect(5)
    table.disconnect(5)  # more ends than counted starts: never below 0
    assert table.get(5).connections == 0


def test_the_client_table_is_bounded():
    assert shared.SharedClientTable.size(100_000) < 8 << 20
