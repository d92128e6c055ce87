"""
A LoRA run's adapter merged into its base model, W + (alpha / r) B A for each adapted layer, and
saved as a full Hugging Face checkpoint (config.json, model.safetensors, the tokenizer's files), for
`python -m infra.evaluate`, transformers or an RL trainer that wants a plain checkpoint:

    python -m infra.merge_lora RUN DEST     # RUN: a LoRA run's --out, or one of its checkpoints
"""

import sys
from pathlib import Path

import torch

from infra import files, hf, rundir
from infra.argtypes import Parser, existing
from infra.files import CheckpointError
from infra.lora import merge


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
    try:
        base = hf.adapter_config(Path(args.run))[0]
        inputs = [("LoRA run", args.run), ("adapter's base checkpoint", base)]
        rundir.prepare_dest(args.dest, inputs)
        merge(args.run, args.dest, getattr(torch, args.dtype))
    except CheckpointError as e:
        print(f"merge_lora: error: {e}", file=sys.stderr)
        return 2
    finally:
        files.unlock()
    print(f"merged {args.run} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
