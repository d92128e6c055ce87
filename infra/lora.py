"""
LoRA runs (--lora R): the model's linear layers get low-rank updates (model.py's add_lora), only
those are trained, and the frozen base is its own reference: --prior inline runs the same module
with its adapters off, so no second model is loaded. The run's model is a PEFT adapter (save_adapter
in infra/hf.py), which peft.PeftModel.from_pretrained loads on transformers' model; --merge, or

    python -m infra.merge_lora RUN DEST

writes it merged into a full Hugging Face checkpoint. docs/lora-and-logging.md has the recipe.
"""

import argparse
from pathlib import Path

import torch

from infra import hf
from infra.argtypes import POSITIVE, UsageError, number
from infra.files import CheckpointError
from model import LORA_TARGETS, LoRALinear, adapters_off, add_lora


def targets(text):
    """An argparse type: comma-separated module names out of LORA_TARGETS, or 'all'."""
    names = list(LORA_TARGETS) if text == "all" else [t for t in text.split(",") if t]
    if not names or any(n not in LORA_TARGETS for n in names):
        raise argparse.ArgumentTypeError(
            f"expected names out of {','.join(LORA_TARGETS)} (comma-separated) or all, got {text!r}"
        )
    return ",".join(dict.fromkeys(names))


def add_arguments(parser):
    g = parser.add_argument_group("LoRA")
    g.add_argument(
        "--lora",
        type=POSITIVE,
        metavar="R",
        help="train rank-R low-rank adapters on the frozen base model, which is then its own "
        "reference (--prior inline: the same model with its adapters off); the run saves a "
        "PEFT adapter. Give it about 20x full fine-tuning's --lr (1e-3 for 5e-5, measured at "
        "rank 16: docs/lora-and-logging.md)",
    )
    g.add_argument(
        "--lora-alpha",
        type=number(float, 0),
        help="scale of the update, alpha / R (default: 2R, as torchtune and TRL's examples)",
    )
    g.add_argument(
        "--lora-dropout",
        type=number(float, 0, low_ok=True, high=0.99),
        default=0.0,
        help="dropout on the adapters' input (0, PEFT's and torchtune's default)",
    )
    g.add_argument(
        "--lora-targets",
        type=targets,
        default=",".join(LORA_TARGETS),
        help="linear layers to adapt, comma-separated, or all (default: all seven, q/k/v/o and "
        "the MLP's gate/up/down, as QLoRA and TRL's all-linear)",
    )
    g.add_argument(
        "--merge",
        action="store_true",
        help="with --lora: at the end also write OUT/merged, the adapter merged into a full "
        "Hugging Face checkpoint (or later: python -m infra.merge_lora OUT DEST)",
    )


def check(lora, merge, is_demo):
    """What the types cannot see: --merge without --lora, and LoRA on the built-in demo (which
    compares full fine-tuning runs). A UsageError says which."""
    if merge and not lora:
        raise UsageError("--merge merges a LoRA adapter: give --lora R too")
    if lora and is_demo:
        raise UsageError(
            "--lora fine-tunes --model on --data; the built-in demo trains every weight"
        )


def alpha(r, lora_alpha):
    return 2.0 * r if lora_alpha is None else lora_alpha


def base_dtype(lora, fsdp, device):
    """The dtype to load a LoRA run's base in: bfloat16 on CUDA, where autocast computes in it
    anyway and nothing of the base is trained (the adapters and their AdamW state stay float32);
    float32 elsewhere, and under FSDP2, which gathers a unit's parameters in one dtype."""
    return torch.bfloat16 if lora and device.type == "cuda" and not fsdp else None


def attach(model, r, lora_alpha, dropout, target_names):
    """--lora R: the model with fresh adapters (step 0 computes exactly the base), or as it is
    when it has them already (a resumed run's checkpoint) or no LoRA is asked for."""
    if not r or model.lora:
        return model
    if model.config.model_type == "gpt2":  # its Hugging Face modules are fused c_attn, Conv1D
        raise CheckpointError("--lora supports the llama, qwen2 and qwen3 families, not gpt2")
    return add_lora(model, r, alpha(r, lora_alpha), dropout, target_names.split(","))


class BaseOf:
    """The frozen reference of a LoRA run with --prior inline: the model being trained, called with
    its adapters off (prift.reference_stats calls it and reads its lm_head). No weights of its own,
    so wrap_distributed leaves it alone."""

    def __init__(self, model):
        self.model, self.lm_head = model, model.lm_head

    def __call__(self, idx, **kw):
        with adapters_off(self.model):
            return self.model(idx, **kw)


def reference(model, ref_dir, model_dir, load):
    """The inline reference: the LoRA model's own base when --ref is --model, else load()."""
    if model.lora and Path(ref_dir).resolve() == Path(model_dir).resolve():
        return BaseOf(model)
    return load()


def merge(run, dest, dtype=None):
    """The adapter in `run` (a LoRA run's OUT, or one of its checkpoints) merged into its base,
    saved in dest as a full Hugging Face checkpoint. Returns the merged model."""
    model = merge_lora(hf.load_model(run, dtype=dtype))
    hf.save_model(model, dest)
    return model


def merge_lora(model):
    """Fold each update into its layer's weight, W += (alpha / r) B A, and drop the adapters: a
    plain model again, which save_pretrained writes as a full checkpoint. Returns the model."""
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.lora_scale
                m.weight += delta.to(m.weight.dtype)  # (out, in)
            for child in ("lora_A", "lora_B", "lora_dropout"):
                delattr(m, child)
            m.__class__ = torch.nn.Linear
    model.lora = None
    return model
