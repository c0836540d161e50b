"""Self-service actions and automations: definitions (runs and dispatch build on them)."""
