"""One module per `cncbrain` subcommand (see `cncbrain.cli`)."""
