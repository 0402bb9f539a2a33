"""CLI subcommands, one module each (see ``opdviz.cli``)."""
