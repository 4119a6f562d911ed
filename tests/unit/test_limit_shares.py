"""A server-wide limit shared out among the workers (`app.share_of_limit`)."""

from __future__ import annotations

import pytest

from geosmtp.app import share_of_limit


@pytest.mark.parametrize(
    ("limit", "shares", "parts"),
    [(5, 2, [3, 2]), (20, 2, [10, 10]), (16, 3, [6, 5, 5]), (1, 2, [1, 1]), (3, 4, [1, 1, 1, 1])],
)
def test_a_server_wide_limit_shared_out_among_workers(limit, shares, parts):
    """relay.concurrency and filter_concurrency: the parts add up to the limit
    (so, say, a kill -9 resends at most relay.concurrency); each has 1 at least."""
    assert [share_of_limit(limit, (i, shares)) for i in range(shares)] == parts
