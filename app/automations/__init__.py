"""Automations: actions whose runs the catalog's and runs' own events create."""
