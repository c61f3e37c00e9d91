from lightning_adamw.cli import main

if __name__ == "__main__":
    main()
