"""strata: launch."""
