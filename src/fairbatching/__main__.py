from fairbatching.cli import main

main()
