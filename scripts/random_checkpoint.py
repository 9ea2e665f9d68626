#!/usr/bin/env python3
"""Write a random-weight Meta-format checkpoint with a real Llama 3 architecture (fewer layers if asked).

Example: Llama 3 8B widths (dim 4096, 32/8 heads, FFN 14336, vocab 128256), 2 layers, 2 shards:
    python scripts/random_checkpoint.py --preset llama3-8b --layers 2 --mp 2 /tmp/llama3-8b-2l
"""

from __future__ import annotations

import argparse
import sys

import torch

from llama3_dist.args import PRESETS, TIED
from llama3_dist.checkpoint.synthetic import write_random_meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--layers", type=int, help="keep only this many layers (default: all)")
    parser.add_argument("--mp", type=int, default=1, help="model-parallel shards, as Meta splits them")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = dict(PRESETS[args.preset])
    if args.layers is not None:
        if not 1 <= args.layers <= params["n_layers"]:
            print(f"error: --layers must be in 1..{params['n_layers']}", file=sys.stderr)
            return 2
        params["n_layers"] = args.layers
    try:
        path = write_random_meta(
            args.out, params, args.mp, args.seed, getattr(torch, args.dtype), tied=args.preset in TIED
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
