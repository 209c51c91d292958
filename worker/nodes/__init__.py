"""Node inventory for the worker and CLI: source configuration, concurrent queries, the Redis cache."""
