"""hipseg benchmarks (asv layout; run directly with `python benchmarks/run.py`)."""
