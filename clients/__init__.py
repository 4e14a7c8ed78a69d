"""Clients for InfoMamba Serve: the Python client library and the `infomamba` command line."""
