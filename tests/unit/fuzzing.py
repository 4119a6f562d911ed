"""Hypothesis settings shared by the fuzz tests of the protocol cores (issue 19).

In CI (the default) every run is the same: `derandomize` draws the examples
from a fixed seed, there is no example database (nothing is written to
`.hypothesis/`), and the number of examples keeps both cores' fuzz tests
under about 40 seconds together.

A longer, random run, locally:

    GEOSMTP_FUZZ=long .venv/bin/python -m pytest -q tests/unit/test_smtp_fuzz.py \
        tests/unit/test_pop3_fuzz.py

`GEOSMTP_FUZZ=long` multiplies the examples by 50 (`GEOSMTP_FUZZ_SCALE=n` sets
the factor) and draws new ones on every run; a failure prints the example
and the `@reproduce_failure` blob to keep it with.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

LONG = os.environ.get("GEOSMTP_FUZZ", "") == "long"
SCALE = int(os.environ.get("GEOSMTP_FUZZ_SCALE", "50")) if LONG else 1


def fuzz_settings(max_examples: int, **kwargs: object) -> settings:
    """Settings for one fuzz test: `max_examples` in CI, SCALE times that in a long run."""
    return settings(
        max_examples=max_examples * SCALE,
        derandomize=not LONG,
        database=None,
        deadline=None,
        print_blob=LONG,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,  # type: ignore[arg-type]
    )


class _Handshake:
    def __repr__(self) -> str:
        return "HANDSHAKE"


#: In a fuzz shell's input log: the TLS handshake happened here.
HANDSHAKE = _Handshake()


def replay(make_shell: Callable[[], Any], log: list, cut: Callable[[bytes], list[bytes]]) -> Any:
    """Run a fuzz shell's logged input again through a fresh one: each TLS
    phase's bytes joined and cut into reads by `cut`. What a shell logs: the
    bytes of each `send()` (b"" for the end of input), and HANDSHAKE where it
    did the handshake after STARTTLS/STLS; bytes that came behind the command
    in the same phase were sent in the clear and are never read."""
    shell = make_shell()
    phases: list[list[bytes]] = [[]]
    for item in log:
        if item is HANDSHAKE:
            phases.append([])
        else:
            phases[-1].append(item)
    for n, phase in enumerate(phases):
        if n:
            assert shell.log[-1] is HANDSHAKE, "the replay did not reach the same handshake"
        data = b"".join(phase)
        handshakes = shell.log.count(HANDSHAKE)
        for piece in cut(data) if data else []:
            shell.send(piece)
            if shell.log.count(HANDSHAKE) > handshakes:
                break  # the rest was sent in the clear behind STARTTLS: never read
        if phase and phase[-1] == b"":
            shell.send(b"")
    return shell


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_cuts(seed: int) -> Callable[[bytes], list[bytes]]:
    """Cut data into reads at up to 12 random points, the same for a seed."""
    rng = random.Random(seed)

    def cut(data: bytes) -> list[bytes]:
        points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
        return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    return cut


def assert_split_invariant(make_shell: Callable[[], Any], steps: list[bytes], seed: int) -> None:
    """Feed `steps` (then the end of input) to a fresh shell, as a client that
    waits for each reply; then the same input, replayed whole, octet by octet
    and cut at random points, must give exactly the same replies and events."""
    first = make_shell()
    for step in [*steps, b""]:
        first.send(step)
    assert first.ended
    for cut, how in (
        (whole, "one read per TLS phase"),
        (bytewise, "octet by octet"),
        (random_cuts(seed), f"at random (seed {seed})"),
    ):
        assert_same_run(first, replay(make_shell, first.log, cut), how)


def assert_same_run(first: Any, second: Any, how: str) -> None:
    """Two fuzz shells saw the same replies and events (`how` the input was cut)."""
    assert second.replies == first.replies, f"replies differ when the input is cut {how}"
    assert second.events == first.events, f"events differ when the input is cut {how}"
