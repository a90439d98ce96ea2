"""Small helpers shared by several packages (files, names, processes)."""
