"""ml_collections configs: `get_config(arg)` in one file per released variant."""
