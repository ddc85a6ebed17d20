from arm_cli.main import main

main()
