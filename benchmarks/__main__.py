"""`python -m benchmarks [--quick] [--out DIR]`: see `benchmarks/run.py`."""

from .run import main


main()
