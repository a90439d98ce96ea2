"""cloudlet: run a user's service VM one hop away, provisioned from compact VM overlays."""

__version__ = "0.1.0"
