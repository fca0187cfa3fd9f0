"""Ray Data jobs, one module per DVC stage; each is a thin linear DAG over cogportrait functions."""
