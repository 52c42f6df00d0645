"""The tests' rank processes: `overlap.launch.RankPool` with one intra-op thread per rank."""

from __future__ import annotations

from overlap.launch import RankError, RankPool

__all__ = ["RankError", "RankPool"]
