"""strata: data_pipeline."""
