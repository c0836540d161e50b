"""Workflows: graphs of triggers, actions and conditions, run node by node."""
