"""``python -m mmx.cli``: the same command line as the ``mmx`` script (e.g. under ``accelerate launch -m mmx.cli``)."""

from mmx.cli import main

main()
