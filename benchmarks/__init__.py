"""Judging models: challenge-exact metrics, CPU latency, FLOPs and the leaderboard."""

import zoo  # noqa: F401  first, for its Ctrl-C start-up guard (zoo.interrupts)
