from hiresctl.cli import main

main()
