"""Train end to end: `python main.py` (same as `python main.py run`). See `--help`."""

import sys

from metal_defect.cli import main

if __name__ == "__main__":
    sys.exit(main())
