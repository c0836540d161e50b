"""Incoming webhooks (Port's "webhook integrations"): definitions, ingest, and the worker
that maps accepted events into entities."""
