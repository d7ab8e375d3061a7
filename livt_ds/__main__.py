"""`python -m livt_ds ...` is the same as the `livt` console script."""

from livt_ds.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
