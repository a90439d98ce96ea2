"""``cloudlet serve``: the HTTP layer (FastAPI), thin over :mod:`cloudlet.services`.

- :mod:`.app`       the application: lifespan, error mapping, routers
- :mod:`.auth`      bearer tokens and the role policy
- :mod:`.metrics`   Prometheus metrics and the request-latency middleware
- :mod:`.routers`   one small module per resource under ``/v1``
"""

from cloudlet.server.app import create_app

__all__ = ["create_app"]
