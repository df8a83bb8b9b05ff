"""Model architectures, the registry that picks one from config.json, and the weight loader."""
