"""The catalog: blueprints, entities and relations."""
