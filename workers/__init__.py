"""Pipeline workers of pacsnode (Celery tasks, preprocessing, result encoding)."""
