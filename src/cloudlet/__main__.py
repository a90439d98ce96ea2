"""``python -m cloudlet`` is the ``cloudlet`` command."""

from cloudlet.cli.main import run

run()
