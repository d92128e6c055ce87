"""
PriFT in TRL's SFTTrainer, in one file to copy (tested with TRL 1.16 and transformers 5.24; prift is
not needed).

    python prift.py --rule mass --model BASE --data train.jsonl --inspect --out prior
                                        # once: the prior as a dataset

prior/tokens.jsonl has, per example, `input_ids`, `labels` (Hugging Face's convention: unshifted,
-100 where not trained) and, aligned with `labels`, `prior_p` and `prior_u`: the frozen reference's
probability of each label and its mass score (the reference's probability of every token strictly
less likely than the label, plus the label's own). PriftTrainer weights each label's cross-entropy
by the rule's detached weight:

    sft 1,  dft p(y_t) of the model being trained,  prob q(y_t),  mass 1[u_t >= 0.5],
    profit 1[p(y_t) >= 0.1]

with q and u from those columns (no reference model in memory: an SFT step's cost), or from
`ref_model`, a frozen model run on every batch on the policy's own inputs. With LoRA (TRL's
peft_config=LoraConfig(...)), ref_model="base" makes the reference the policy itself with its
adapter disabled, as prift's --lora does: no second model. Build prift's optimizer after the
trainer, over the adapters PEFT has added: trainer.optimizer, trainer.lr_scheduler =
prift_optimizer(trainer.model, lr, total_steps). The loss is sum_t w_t CE_t over the whole optimizer
batch (all micro-batches, all ranks), divided by its trained tokens, also those of weight 0.
Settings (prift's README, "For porters"): SFTConfig(remove_unused_columns=False, max_length=None,
bf16=False on a CPU, use_cpu=True under torchrun on CPUs) and optimizers=prift_optimizer(model, lr,
total_steps) for prift's optimizer and schedule; in_prift_order(dataset, batch_size, steps, seed)
with SFTConfig(train_sampling_strategy="sequential") for prift's data order. Each step's log has
`kept`, the fraction of trained tokens of weight > 0, as prift's metrics.jsonl (ports/compare.py
reads it).
"""

import contextlib
import math

import torch
from trl import SFTTrainer

RULES = {
    "sft": (None, None),
    "dft": ("online", None),
    "prob": ("prior", None),
    "mass": ("prior", 0.5),
    "profit": ("online", 0.1),
}  # rule: (where p and u come from, threshold)


def target_stats(logits, labels):
    """logits (B, T, V), labels (B, T) -> p (B, T), the probability of each label, and u (B, T), its
    mass score: the probability of every token strictly less likely than the label (ties not
    counted) plus its own. float32."""
    probs = logits.float().softmax(-1)
    p = probs.gather(-1, labels.clamp(min=0)[..., None])  # (B, T, 1)
    return p[..., 0], torch.where(probs < p, probs, 0).sum(-1) + p[..., 0]


def rule_weights(rule, p, u, threshold):
    """The detached weight of each token from its p and u."""
    if rule == "sft":
        return torch.ones_like(p)
    return (
        p.detach().float()
        if rule in ("dft", "prob")
        else ((p if rule == "profit" else u) >= threshold).float()
    )


def prift_optimizer(model, lr, total_steps, warmup=0.1):
    """prift's optimizer and schedule, for optimizers=(...): AdamW, betas (0.9, 0.95), weight decay
    0.01 on every trained parameter (with LoRA: the adapters); linear warmup over int(10%) of the
    steps starting at lr / n_warm (not 0), then cosine to 0."""
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    n_warm = max(1, int(warmup * total_steps))

    def factor(step):
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total_steps - n_warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def in_prift_order(dataset, batch_size, steps, seed=0, drop_last=False):
    """The dataset (prift's tokens.jsonl) laid out in prift's data order, for a Trainer with
    train_sampling_strategy="sequential": step s trains rows s*batch_size to (s+1)*batch_size, the
    examples prift.batch_order(len(dataset), batch_size, s, seed) gives (reimplemented here: each
    epoch a fresh torch.randperm seeded seed * 1000 + epoch). drop_last: --match-authors's order."""
    n = len(dataset)
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    order = []
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        batch = perm.tolist()[i * batch_size : (i + 1) * batch_size]
        if len(batch) < batch_size:  # Trainer's batches are all as large: the rest would shift
            raise ValueError(
                f"prift's step {step} has {len(batch)} examples (the end of an epoch of {n}), "
                f"Trainer's all {batch_size}: train fewer steps or use a batch size dividing {n}"
            )
        order += batch
    return dataset.select(order)


class PriorCollator:
    """Pads input_ids, labels (-100) and the prior's columns on the right and adds the attention
    mask; keeps tokens.jsonl's `row`. SFTTrainer's own collator drops prior_p and prior_u, so
    PriftTrainer uses this one."""

    def __init__(self, pad_token_id=0):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        T = max(len(e["input_ids"]) for e in examples)

        def pad(key, value, dtype):
            return torch.tensor(
                [list(e[key]) + [value] * (T - len(e[key])) for e in examples], dtype=dtype
            )

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            # kept on purpose (compute_loss takes it out before the model sees it): which example of
            # the data file each row is, to line a batch up with prift's
            **({"row": torch.tensor([e["row"] for e in examples])} if "row" in examples[0] else {}),
            "labels": pad("labels", -100, torch.long),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (T - len(e["input_ids"])) for e in examples]
            ),
        }
        if "prior_p" in examples[0]:
            if any(len(e["prior_p"]) != len(e["input_ids"]) for e in examples):
                raise ValueError(
                    "prior_p is not as long as input_ids: SFTTrainer truncated the ids but "
                    "not the prior; "
                    "pass SFTConfig(max_length=None) (prift --max-len already cut the examples)"
                )
            batch["prior_p"], batch["prior_u"] = (
                pad("prior_p", 0.0, torch.float32),
                pad("prior_u", 0.0, torch.float32),
            )
        return batch


class PriftTrainer(SFTTrainer):
    """SFTTrainer with a PriFT rule. Keep the prior's columns with
    SFTConfig(remove_unused_columns=False, max_length=None); average_tokens_across_devices (the
    default) must stay True."""

    # normalised by the whole optimizer batch: Trainer must not divide by the steps
    loss_is_scaled_for_ga = True

    def __init__(self, *args, rule="mass", signal=None, threshold=None, ref_model=None, **kwargs):
        self.rule, self.signal = rule, signal or RULES[rule][0]
        self.threshold = RULES[rule][1] if threshold is None else threshold
        kwargs.setdefault("data_collator", PriorCollator())
        super().__init__(*args, **kwargs)
        # the kept fraction of each step, logged as `kept` (prift's metrics.jsonl has it): this
        # rank's kept tokens over the step's trained tokens, summed over the micro-batches since
        # the log, and the step they began at (a resumed run begins past 0)
        self._kept, self._kept_from = torch.zeros((), device=self.accelerator.device), None
        if ref_model == "base" and not hasattr(self.model, "disable_adapter"):
            raise ValueError(
                'ref_model="base" is the PEFT policy with its adapter off: pass peft_config'
            )
        self.ref_model = (
            ref_model.to(self.accelerator.device).eval().requires_grad_(False)
            if ref_model not in (None, "base")
            else ref_model
        )
        if not self.args.average_tokens_across_devices:
            raise ValueError(
                "PriftTrainer normalises by the tokens of all ranks: keep "
                "average_tokens_across_devices=True"
            )

    def token_weights(self, inputs, log_probs):
        """The weight of each next-token label (B, T-1), from the signal the rule reads."""
        labels = inputs["labels"][:, 1:]
        if self.signal == "online":
            if self.rule == "mass":
                raise ValueError("mass with the online signal needs the full logits: use prift.py")
            p = u = log_probs.detach().exp()
        elif self.signal == "prior" and self.ref_model is not None:
            policy_inputs = {
                k: v for k, v in inputs.items() if k not in ("labels", "prior_p", "prior_u", "row")
            }
            with torch.no_grad(), self.reference() as ref:  # the policy's own inputs
                ref_logits = ref(**policy_inputs, use_cache=False).logits
            p, u = target_stats(ref_logits[:, :-1], labels)
        elif self.signal == "prior":
            if "prior_p" not in inputs:
                raise ValueError(
                    "the batch has no prior_p/prior_u: train on prift's tokens.jsonl with "
                    "SFTConfig(remove_unused_columns=False), or pass ref_model"
                )
            p, u = inputs["prior_p"][:, 1:], inputs["prior_u"][:, 1:]
        else:
            p = u = log_probs
        return rule_weights(self.rule, p, u, self.threshold) * (labels != -100)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference: ref_model, or the PEFT policy itself with its adapter disabled (the
        module, not its DDP wrapper: a no-grad forward needs none)."""
        if self.ref_model == "base":
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.ref_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:
            raise ValueError(
                "PriftTrainer needs num_items_in_batch: the trained tokens of the whole "
                "optimizer batch"
            )
        prior = {k: inputs.pop(k) for k in ("prior_p", "prior_u", "row") if k in inputs}
        # TRL's fused head: the log-probability of each next-token label (B, T-1), 0 where -100, no
        # (B, T, V) logits
        out = model(**inputs, use_cache=False, fused_lm_head=True)
        w = self.token_weights({**inputs, **prior}, out.log_probs)
        # num_items_in_batch counts the labels of all ranks, and DDP averages gradients: times the
        # world size
        loss = -(w * out.log_probs).sum() / num_items_in_batch * self.accelerator.num_processes
        if model.training:
            self._kept += (w > 0).sum() / num_items_in_batch
            self._kept_from = self.state.global_step if self._kept_from is None else self._kept_from
        return (loss, out) if return_outputs else loss

    def log(self, logs, start_time=None):
        steps = self.state.global_step - (self._kept_from or 0)
        if "loss" in logs and self._kept_from is not None and steps > 0:  # a training step's log
            logs["kept"] = self.accelerator.reduce(self._kept.clone(), "sum").item() / steps
            self._kept.zero_()
            self._kept_from = None
        super().log(logs, start_time)
