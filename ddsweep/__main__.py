"""`python -m ddsweep`: the same command line as `ddsweep`."""

from ddsweep.cli import main

main()
