"""Pages and dashboards: Port's /v1/pages, their widgets and permissions, and what each
widget shows."""
