"""Infrastructure: the database and migrations, embedded stores, metrics, health."""
