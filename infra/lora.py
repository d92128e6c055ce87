"""
LoRA runs (--lora R): the model's linear layers get low-rank updates (model.py's add_lora), only
those are trained, and the frozen base is its own reference: --prior inline runs the same module
with its adapters off, so no second model is loaded. The run's model is a PEFT adapter (save_adapter
below), which peft.PeftModel.from_pretrained loads on transformers' model; --merge, or

    python -m infra.merge_lora RUN DEST

writes it merged into a full Hugging Face checkpoint. docs/lora-and-logging.md has the recipe.
"""

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from infra import files
from infra.argtypes import POSITIVE, number
from infra.files import CheckpointError
from infra.hf_files import read_headers, read_tensors
from model import GPT, LORA_TARGETS, Config, LoRALinear, adapters_off, add_lora


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
        "PEFT adapter",
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


def check(parser, lora, merge, is_demo):
    """What the types cannot see: --merge without --lora, and LoRA on the built-in demo (which
    compares full fine-tuning runs)."""
    if merge and not lora:
        parser.error("--merge merges a LoRA adapter: give --lora R too")
    if lora and is_demo:
        parser.error("--lora fine-tunes --model on --data; the built-in demo trains every weight")


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
    model = merge_lora(GPT.from_pretrained(run, dtype=dtype))
    model.save_pretrained(dest)
    return model


# ----------------------------------------------------------------------------------------------
# PEFT's format: the adapter alone, loaded on its base, or merged into it


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


def lora_state(model, state_dict=None):
    """The adapters' tensors under PEFT's names (base_model.model. + ours), from a full state dict
    (FSDP's, gathered) or the model's own."""
    state = state_dict or model.state_dict()
    return {"base_model.model." + k: v for k, v in state.items() if ".lora_" in k}


def adapter_config(path):
    """A PEFT LoRA adapter's adapter_config.json, checked: (base, r, alpha, dropout, targets)."""
    try:
        conf = files.read_json(
            path / "adapter_config.json", path, files.JSON_LIMIT, "adapter config"
        )
        base, r, alpha = conf["base_model_name_or_path"], conf["r"], conf["lora_alpha"]
        targets, dropout = conf["target_modules"], conf.get("lora_dropout", 0.0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'adapter_config.json'} is not a LoRA adapter's ({e})")
    plain = isinstance(targets, list) and not conf.get("use_dora") and not conf.get("rank_pattern")
    if conf.get("peft_type") != "LORA" or not plain:
        raise CheckpointError(f"{path}: only plain LoRA adapters load here (peft_type LORA, a list "
                              "of target_modules, one rank)")  # fmt: skip
    return base, r, alpha, dropout, targets


def meta_model(path):
    """The model a checkpoint directory holds, on the meta device (shapes only, nothing read): a
    full checkpoint's, or a LoRA adapter's base with the adapter."""
    path = Path(path)
    adapter = os.path.lexists(path / "adapter_config.json")
    base, r, alpha, dropout, targets = adapter_config(path) if adapter else (path,) + (None,) * 4
    with torch.device("meta"):
        model = GPT(Config.load(base))
        return add_lora(model, r, alpha, dropout, targets) if adapter else model


def load_adapter(path, dtype=None, device=None):
    """A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors): its base
    model (base_model_name_or_path) with the adapter's update on it, the adapter float32."""
    path = Path(path)
    base, r, alpha, dropout, targets = adapter_config(path)
    model = add_lora(GPT.from_pretrained(base, dtype, device), r, alpha, dropout, targets)
    state = {
        k.removeprefix("base_model.model."): v
        for k, v in read_tensors(
            {k: f for k, (f, _) in read_headers([path / "adapter_model.safetensors"]).items()},
            torch.float32,
            torch.device(device or "cpu"),
        ).items()
    }
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    if state.keys() != ours.keys() or any(v.shape != ours[k].shape for k, v in state.items()):
        raise CheckpointError(
            f"{path / 'adapter_model.safetensors'} does not fit {base} with r={r} on "
            f"{', '.join(targets)}"
        )
    model.load_state_dict(state, strict=False)
    return model


def save_adapter(model, path, state_dict=None):
    """Write the LoRA adapter as PEFT does: adapter_config.json and adapter_model.safetensors
    (float32, PEFT's names), beside the base's tokenizer files; no base weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().float().contiguous() for k, v in lora_state(model, state_dict).items()
    }
    conf = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(Path(model.source_dir).resolve()),
        r=model.lora["r"],
        lora_alpha=model.lora["alpha"],
        lora_dropout=model.lora["dropout"],
        target_modules=model.lora["targets"],
        bias="none",
        fan_in_fan_out=False,
        inference_mode=True,
        init_lora_weights=True,
        modules_to_save=None,
        use_rslora=False,
        use_dora=False,
    )
    files.write_with(
        path / "adapter_model.safetensors",
        lambda f, tmp: save_file(state, tmp, metadata={"format": "pt"}),
        "adapter weights",
    )
    files.write_json(path / "adapter_config.json", conf, "adapter config", indent=2)
    model.copy_side_files(path)
