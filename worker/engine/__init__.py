"""The engine: the step state machine, its Redis store, the runner, the sweeper and the Celery app."""
