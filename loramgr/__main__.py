from loramgr.cli.main import main

main()
