"""
A LoRA run's adapter merged into its base model, W + (alpha / r) B A for each adapted layer, and
saved as a full Hugging Face checkpoint (config.json, model.safetensors, the tokenizer's files), for
`python -m infra.evaluate`, transformers or an RL trainer that wants a plain checkpoint:

    python -m infra.merge_lora RUN DEST     # RUN: a LoRA run's --out, or one of its checkpoints
"""

import sys

import torch

from infra.argtypes import Parser, existing
from model import CheckpointError


def main(argv=None):
    parser = Parser(prog="python -m infra.merge_lora", description=__doc__.strip().splitlines()[0])
    parser.add_argument("run", type=existing("dir"), help="a directory holding a PEFT adapter")
    parser.add_argument("dest", help="where to write the merged checkpoint")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the merged weights (the merge itself is done in float32)",
    )
    args = parser.parse_args(argv)
    from infra.lora import merge

    try:
        merge(args.run, args.dest, getattr(torch, args.dtype))
    except CheckpointError as e:
        print(f"merge_lora: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.run} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
