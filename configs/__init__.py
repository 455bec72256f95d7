"""strata configs: one ml_collections file per stage; presets chosen with `:arg`."""
