from ddn_node.cli.main import main

main()
