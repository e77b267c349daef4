"""`python -m slimtune` runs the `slimtune` command."""

from .apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
