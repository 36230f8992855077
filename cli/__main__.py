"""``python -m edgeroute.cli``: the ``edgeroute`` command."""

from edgeroute.cli import main

main()
