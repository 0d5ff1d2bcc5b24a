"""`ruvon showcase`: the production shape (Redis, daphne, a worker, usage ingestion) serving simulated users
through the openai SDK, with a live view of the engine and a report checked against the usage records."""
