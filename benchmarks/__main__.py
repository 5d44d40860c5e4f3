"""``python -m benchmarks [--quick] [--smoke] [--out DIR]``: see benchmarks/README.md."""
import sys

from .cli import main

sys.exit(main())
