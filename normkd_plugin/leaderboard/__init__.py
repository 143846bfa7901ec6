"""normkd-leaderboard: runs found on disk, aggregated and compared with published numbers."""
