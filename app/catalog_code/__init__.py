"""Catalog as code: blueprints, scorecards and actions kept as files (`portolan apply`,
`portolan export`)."""
