"""`python -m tun2g.cli` runs the command line."""

from tun2g.cli import main

main()
