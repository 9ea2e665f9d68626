"""`python -m llama3_dist.bench ENGINE ...`: one bench worker, the process `run.launch` starts per engine."""

import sys

from .engines import worker

if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
