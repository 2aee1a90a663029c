from pipelines.toyworld.generate import main

main()
