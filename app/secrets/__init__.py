"""Organization secrets (Port's /v1/organization/secrets) and webhook signing secrets."""
