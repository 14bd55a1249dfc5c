"""The built-in offline demo: a tiny random-weight model made locally, and its demo tasks."""
