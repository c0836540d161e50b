"""Integrations: Port's Ocean integrations, their mapping, resync state, examples and logs."""
