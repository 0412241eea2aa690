"""llmbatch workers: the Celery app and tasks, and the generation engine (worker/engine)."""
