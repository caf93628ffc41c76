"""One module per CLI command; see arbiter/cli.py for the protocol."""
