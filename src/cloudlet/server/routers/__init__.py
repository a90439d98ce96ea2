"""One router per resource under ``/v1``; each is a thin mapping onto the core."""
