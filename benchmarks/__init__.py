"""Judging models: challenge-exact metrics, CPU latency, FLOPs and the leaderboard."""
