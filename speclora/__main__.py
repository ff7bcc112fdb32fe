"""`python -m speclora` runs the CLI."""

from speclora.client.cli import main

if __name__ == "__main__":
    main()
