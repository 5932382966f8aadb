"""One module per ``flover`` subcommand: ``add_parser`` and the function it runs."""
