"""``python -m lightning_epfl`` runs the package CLI."""

from lightning_epfl.cli import main

if __name__ == "__main__":
    main()
