from meterdrop.cli import main

main()
