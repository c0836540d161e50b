"""Entity history: properties over time, the timeline of changes, entities as they were."""
