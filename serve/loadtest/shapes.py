"""The load shape as a list of stages ``(end_s, users, spawn_rate)``; locust's LoadTestShape
(in locustfile.py) asks ``users_at(stages, t)`` every second. No locust import here."""

from __future__ import annotations

from typing import Any


def stages(shape: dict[str, Any]) -> list[tuple[float, int, float]]:
    """Stages of the ``shape`` section of LoadTestConfig (as a dict), with cumulative end times."""
    kind, users, rate, dur = (
        shape["kind"],
        int(shape["users"]),
        float(shape["spawn_rate"]),
        float(shape["duration_s"]),
    )
    if kind == "steady":
        return [(dur, users, rate)]
    if kind == "ramp":  # one more user at each of `users` equal steps
        step = dur / users
        return [(step * (i + 1), i + 1, rate) for i in range(users)]
    if kind == "spike":
        start, end = float(shape["spike_start_s"]), float(shape["spike_start_s"]) + float(shape["spike_s"])
        base = int(shape["base_users"])
        out = [(start, base, rate)] if start > 0 else []
        return [*out, (end, users, rate), (dur, base, rate)] if end < dur else [*out, (end, users, rate)]
    if kind == "stages":
        t, out = 0.0, []
        for s in shape["stages"]:
            t += float(s["duration_s"])
            out.append((t, int(s["users"]), float(s["spawn_rate"])))
        return out
    raise ValueError(f"unknown shape kind {kind!r}")


def users_at(plan: list[tuple[float, int, float]], t: float) -> tuple[int, float] | None:
    """(users, spawn_rate) at run time ``t``; None once the last stage ended (locust stops)."""
    for end, users, rate in plan:
        if t < end:
            return users, rate
    return None
