"""The `recserve` command (cli.py) and its heavier subcommands: `serve` (serve.py), `replay` (replay.py)."""
