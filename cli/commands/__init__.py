"""CLI subcommands: each module has ``add_arguments(parser)`` and ``run(args) -> int``.

Heavy imports (torch, transformers) stay inside ``run`` so ``gemserve --help`` and the light
client commands start fast and work without the ``serve`` extra.
"""
