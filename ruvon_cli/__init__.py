"""The `ruvon` command line (generate, pull, worker, workers, chat) and its HTTP chat client."""
