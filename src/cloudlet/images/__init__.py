"""Guest images: build the tiny image from Debian packages, import disks, keep them in a store.

Public entry points: :func:`cloudlet.images.tiny.build_tiny` and
:class:`cloudlet.images.store.ImageStore`; the record is :class:`cloudlet.images.model.Image`.
"""
