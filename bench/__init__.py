"""Benchmarks: `headwater bench NAME|all` (see BENCHMARKS.md)."""
