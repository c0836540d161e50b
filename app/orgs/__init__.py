"""Organizations (tenants)."""
