"""Entry point of `python -m data` (see data/cli.py)."""

from data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
