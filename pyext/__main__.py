"""`python -m slimtune` runs the `slimtune` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
