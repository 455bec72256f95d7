"""strata: model."""
