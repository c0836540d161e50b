"""Database access: metadata, engines, tenant-bound sessions, row-level security helpers."""
