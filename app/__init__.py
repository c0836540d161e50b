"""Portolan: a multi-tenant internal developer portal backend that speaks Port's API."""

__version__ = "0.1.0"
