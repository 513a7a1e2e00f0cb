"""Controllers: thin kopf handlers that read, call the builders, apply, and write status."""
