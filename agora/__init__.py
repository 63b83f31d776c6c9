"""The `agora` command line: one module per command group under agora/commands/,
assembled by agora/cli.py."""
