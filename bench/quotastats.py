"""Figures of the ``quota`` scenario, from the sink's arrival times.

Standard library only: worker.py (in a benchmark venv) computes the
scenario's figures with it, run.py (any python3) can recompute them from
the raw arrival times kept in the JSON result.

``python3 bench/quotastats.py`` runs a self-check.
"""

import bisect
import collections


def max_in_window(times, width=1.0):
    """The most arrivals in any sliding window ``[t, t + width)`` that starts
    at an arrival ``t`` (exact: every window holding the most arrivals can be
    slid right until its left edge meets an arrival). 0 for no arrivals."""
    ts = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(ts):
        end = t + width
        if j < i:
            j = i
        while j < len(ts) and ts[j] < end:
            j += 1
        best = max(best, j - i)
    return best


def busiest_window(times, width=1.0):
    """(start, count) of the first window ``[start, start + width)`` holding
    max_in_window(times) arrivals; (None, 0) for no arrivals."""
    ts = sorted(times)
    best = (None, 0)
    for i, t in enumerate(ts):
        count = bisect.bisect_left(ts, t + width, i) - i
        if count > best[1]:
            best = (t, count)
    return best


def mean_rate(times):
    """Messages / (last arrival - first arrival), as the issue defines the
    run's mean; None with fewer than two arrivals or no time between them."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return len(times) / span if span > 0 else None


def arrival_counts(msgids, expected):
    """Duplicates (extra arrivals of one Message-ID), missing expected ones,
    unexpected ones, among the Message-IDs the sink accepted."""
    counts = collections.Counter(msgids)
    expected = set(expected)
    return {
        "received": len(msgids),
        "unique": len(counts),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "duplicated_ids": sorted(k for k, c in counts.items() if c > 1),
        "missing": len(expected - set(counts)),
        "missing_ids": sorted(expected - set(counts)),
        "unexpected": sum(c for k, c in counts.items() if k not in expected),
    }


def gaps_after(events, starts):
    """For every event time, the time until the first start strictly after it
    (None when nothing started after it): how long a provider that pushed
    back stayed quiet, counting only transactions begun after its 421."""
    ss = sorted(starts)
    out = []
    for t in sorted(events):
        k = bisect.bisect_right(ss, t)
        out.append(ss[k] - t if k < len(ss) else None)
    return out


def starts_after(events, starts, lo, hi):
    """How many starts fall ``lo`` to ``hi`` seconds after some event (each
    start counted once, however many events it follows): transactions a
    provider saw begin while the route should have been paused."""
    ev = sorted(events)
    n = 0
    for s in starts:
        # Some event in (s - hi, s - lo] iff the latest one at or before
        # s - lo is after s - hi.
        k = bisect.bisect_right(ev, s - lo)
        if k and ev[k - 1] > s - hi:
            n += 1
    return n


def count_paused(lines, level=None):
    """Lines that mention a pause ("paused", any case): the workers' pause
    WARNINGs, whose exact wording is not fixed (``level``: only the lines
    that also name that log level, e.g. "WARNING")."""
    return sum(
        1 for line in lines if "paused" in line.lower() and (level is None or level.lower() in line.lower())
    )


# --------------------------------------------------------------------------
# self-check
# --------------------------------------------------------------------------


def _brute_max(times, width=1.0):
    return max((sum(1 for u in times if t <= u < t + width) for t in times), default=0)


def self_check():
    import random

    assert max_in_window([]) == 0
    assert max_in_window([5.0]) == 1
    # [t, t + 1) is half-open: an arrival exactly 1 s later is in the next window.
    assert max_in_window([0.0, 1.0]) == 1
    assert max_in_window([0.0, 0.999999, 1.0]) == 2
    # 20/s spaced evenly: 20 in every window (0.00 .. 0.95), never 21.
    even = [i / 20 for i in range(200)]
    assert max_in_window(even) == 20, max_in_window(even)
    # 20/s plus a burst of 2 at the start: 22.
    assert max_in_window([0.0, 0.0] + even) == 22
    # A fixed per-second counter ("20 in each calendar second") lets 40 through
    # in one sliding second: 20 at the end of one second, 20 at the start of the next.
    fixed = [0.9 + i * 0.004 for i in range(20)] + [1.0 + i * 0.004 for i in range(20)]
    assert max_in_window(fixed) == 40, max_in_window(fixed)
    # Unsorted input, equal times.
    assert max_in_window([3.0, 1.0, 1.0, 2.5, 1.5]) == 3
    assert busiest_window([3.0, 1.0, 1.0, 2.5, 1.5]) == (1.0, 3)
    assert busiest_window([]) == (None, 0)
    # Against brute force on random data, several widths.
    rnd = random.Random(29)
    for _ in range(300):
        ts = [round(rnd.uniform(0, 5), rnd.choice([1, 2, 6])) for _ in range(rnd.randint(0, 60))]
        for w in (0.5, 1.0, 2.0):
            assert max_in_window(ts, w) == _brute_max(ts, w), (ts, w)
            assert busiest_window(ts, w)[1] == _brute_max(ts, w)
    assert mean_rate([]) is None and mean_rate([1.0]) is None and mean_rate([1.0, 1.0]) is None
    assert abs(mean_rate(even) - 200 / 9.95) < 1e-9
    c = arrival_counts(["a", "b", "b", "x"], ["a", "b", "c"])
    assert (c["duplicates"], c["missing"], c["unexpected"], c["unique"]) == (1, 1, 1, 3), c
    assert c["duplicated_ids"] == ["b"] and c["missing_ids"] == ["c"]
    assert gaps_after([1.0, 5.0], [0.5, 1.0, 2.5, 3.0]) == [1.5, None]
    assert starts_after([1.0], [1.1, 1.3, 1.79, 1.8, 2.5], 0.2, 0.8) == 2
    assert starts_after([1.0, 1.5], [1.3, 1.8, 2.2, 2.4], 0.2, 0.8) == 3  # 1.8 once
    assert starts_after([], [1.0], 0.2, 0.8) == 0
    for _ in range(200):
        ev = [rnd.uniform(0, 5) for _ in range(rnd.randint(0, 6))]
        st = [rnd.uniform(0, 6) for _ in range(rnd.randint(0, 40))]
        want = sum(1 for x in st if any(t + 0.2 <= x < t + 0.8 for t in ev))
        assert starts_after(ev, st, 0.2, 0.8) == want, (ev, st)
    assert count_paused(["WARNING route 'q' paused for 1.2 s", "Paused", "sent", ""]) == 2
    assert count_paused(["WARNING route 'q' paused for 1.2 s", "INFO q is paused", "sent"], "WARNING") == 1
    return True


if __name__ == "__main__":
    self_check()
    print("quotastats: self-check passed")
