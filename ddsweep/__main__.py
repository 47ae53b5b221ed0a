from ddsweep.cli import main

main()
