"""Model presets as data: one config.json-style file per model (see mage_jax.config)."""
