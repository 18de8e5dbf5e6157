"""A self-contained demo: a tiny training job and the daemon running beside it."""
