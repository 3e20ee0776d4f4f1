"""The ``vsteer`` command line: one module per subcommand, above the library packages
(engine, extract, eval, serving), so no library package dispatches to another."""
