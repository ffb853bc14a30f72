from edge_adapt.cli import main

main()
