"""strata: train."""
