"""Durable dispatch: the arq worker (outbox relay and invokers arrive with actions)."""
