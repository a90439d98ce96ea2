"""Zeroconf (mDNS/DNS-SD) discovery of cloudlets, as KD-Cloudlet defined it.

A cloudlet advertises ``_cloudlet._tcp.local.`` on its API port, with its name as the instance
name and exactly one TXT pair, ``encryption=enabled|disabled`` (KD-Cloudlet's Java client splits
the whole TXT string on ``=``, so a second pair breaks it).

- :mod:`.advertise`  the server side (python-zeroconf, asyncio), withdrawn at shutdown
- :mod:`.browse`     the client side: what answers on the local network
"""

from cloudlet.discovery.advertise import SERVICE_TYPE, Advertiser, start_advertising
from cloudlet.discovery.browse import Found, discover

__all__ = ["SERVICE_TYPE", "Advertiser", "Found", "discover", "start_advertising"]
