"""Benchmarks that measure side by side in one run and return numbers; the CLI prints their ratios."""
