"""Importing Backstage catalogs (`catalog-info.yaml`) into Portolan through its API:
reader.py (files -> documents), mapping.py (documents -> blueprints, entities, teams, users),
importer.py (plan against the server, write, report)."""
