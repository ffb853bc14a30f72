"""Benchmarks: functions that measure and return numbers; printing is left to their callers."""
