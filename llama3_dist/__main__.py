"""`python -m llama3_dist` == the `llama3-dist` console script."""

import sys

from .cli import main

sys.exit(main())
