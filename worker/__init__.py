"""The stepworker engine: settings, Celery app, runner, Redis store, credentials and interfaces."""
