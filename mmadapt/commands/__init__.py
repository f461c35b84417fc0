"""One module per ``mmadapt`` sub-command: ``add_arguments(parser)`` and ``run(args)``."""
