"""``python -m lungsys``: the same as the ``lungsys`` command."""

from lungsys.app import main

main()
