"""``gemserve``, the composition root: it wires every layer (server, evals, clients, bench) into
one command line, and nothing imports it. ``python -m cli`` is the same as ``gemserve``."""
