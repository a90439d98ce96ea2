"""The ``cloudlet`` command: thin Typer commands over the core packages (one module each)."""
