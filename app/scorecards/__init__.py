"""Scorecards: levels and rules over a blueprint's entities, evaluated in PostgreSQL."""
