"""strata: benchmarks."""
