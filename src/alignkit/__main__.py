"""`python -m alignkit ...` behaves exactly like the `alignkit` console script."""

from alignkit.cli import main

if __name__ == "__main__":
    main()
