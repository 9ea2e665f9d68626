"""llama3_dist: Llama 3 inference with hand-written tensor and pipeline parallelism."""

__version__ = "0.1.0"
