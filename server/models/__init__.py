"""Built-in model manifests (TOML, one file per version)."""
