"""The `deepeyesv2` sub-commands: one module per command, each with `main(argv) -> exit code`."""
