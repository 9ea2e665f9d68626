"""`llama3-dist bench`: llama3_dist against its peers on the same weights, one process per engine.

run.py: settings, launching the workers, bandwidth, the summary table; engines.py: the per-engine workers
(`python -m llama3_dist.bench`); convert.py: the peers' checkpoints (transformers model, GGUF in F32, BF16 or Q8_0).
"""

from .convert import checkpoint_for, hf_model_from, write_llama_gguf
from .engines import DTYPES, open_bench_checkpoint, prompt_ids, wait, worker
from .run import run_bench, table

__all__ = [
    "DTYPES",
    "checkpoint_for",
    "hf_model_from",
    "open_bench_checkpoint",
    "prompt_ids",
    "run_bench",
    "table",
    "wait",
    "worker",
    "write_llama_gguf",
]
