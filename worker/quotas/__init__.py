"""AWS quotas as a fleet-wide resource: limits as data, buckets and slots in Redis, the boto hooks."""
