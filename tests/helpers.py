"""The tests' helpers: tiny real checkpoints and JSONL data, made in a few hundred milliseconds;
tiny random Hugging Face checkpoints of each family, built and saved with transformers (used only
as an independent oracle for model.py), so no test downloads anything; run directories, command
lines and what runs leave on disk."""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import prift  # noqa: E402
from infra import demo, evaluate, files, hf  # noqa: E402
from model import GPT, Config  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The core's calls in the conventions the tests were written in


def read_jsonl(path, need="response", max_len=None):
    """A JSONL file's examples as a run reads them: training data (need "response"), or an
    evaluation file's problems with their gold answers (need "answer")."""
    if need == "answer":
        return evaluate.read_problems(path, max_len)
    return files.read_jsonl(path, data.training_example, max_len)


def write_jsonl(rows, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def config_of(d):
    """model.Config of a config.json's dict, checked as a checkpoint's is."""
    return Config.from_hf(hf.check_config(d))


def rule_weights(rule, p, u, threshold=None):
    """The weights of `rule` from a signal's p and u (the rule's own threshold unless given)."""
    return prift.rule_settings(rule, threshold=threshold).weight(
        p, u, prift.rule_settings(rule, threshold=threshold).threshold
    )


def token_weights(rule, targets, logits, ref_logits=None, threshold=None, signal=None):
    """The weights (B, T) of targets (B, T) (-100: not trained, weight of token 0) from the logits
    (B, T, V) of the model being trained, or ref_logits of the frozen reference: token_losses'."""
    flat = targets.flatten().clamp(min=0)
    prior = None
    if prift.rule_settings(rule, signal).signal == "prior":
        if ref_logits is None:
            raise ValueError(f"rule {rule!r} with the prior signal needs ref_logits")
        prior = torch.stack(prift.target_stats(ref_logits.flatten(0, -2), flat), 1)
    w, _ = prift.token_losses(logits.flatten(0, -2), flat, rule, signal, threshold, prior)
    return w.view(targets.shape)


def make_checkpoint(path, seed=0, hidden=32, layers=2, vocab_size=120, tie=True, pretrain_steps=0):
    """A random llama-family checkpoint with a BPE tokenizer trained on the demo corpus:
    config.json, model.safetensors, tokenizer.json and tokenizer_config.json, as a downloaded one
    has.

    pretrain_steps: first train it that many steps (plain cross-entropy, AdamW, 16 windows of 32
    tokens of the corpus), so that it predicts the demo's text. A random one gives every token about
    1/vocab (at most 0.015): a rule with a threshold (profit keeps p >= 0.1) then keeps nothing. 20
    steps (half a second) give p >= 0.1 on most, not all, tokens of make_data's problems."""
    path = Path(path)
    rows = demo.pretrain_corpus(300, seed=0)
    tok = demo.tokenizer([r["response"] for r in rows], vocab_size=vocab_size)
    cfg = dict(
        model_type="llama",
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        hidden_act="silu",
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = GPT(config_of(cfg))
    if pretrain_steps:
        pretrain(
            model,
            [i for r in rows for i in tok.encode(r["response"]).ids + [cfg["eos_token_id"]]],
            pretrain_steps,
        )
    hf.save_model(model, path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


def pretrain(model, stream, steps, lr=1e-2):
    """A plain language-model loop on one token stream (no code of prift's training): random
    windows.
    """
    stream, g = torch.tensor(stream), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=g)
        window = torch.stack([stream[s : s + 33] for s in starts.tolist()])  # (16, 33)
        logits = model(window[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


def assert_some_kept(rows):
    """rows: metrics.jsonl's rows (dicts) of a run with a 0/1 rule. The rule kept some response
    tokens and dropped others: a run whose weights are all 0 (no gradient) or all 1 (sft) tests
    nothing of the rule."""
    kept = [r["kept"] for r in rows]
    assert 0 < sum(kept) / len(kept) < 1, (
        f"kept fractions {kept}: the rule kept every token or none"
    )
    assert not any(r["kept"] > 0 and (r["loss"] == 0 or r["grad_norm"] == 0) for r in rows), rows


def read_metrics(out):
    """The rows of out/metrics.jsonl, as dicts."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def metrics_steps(out):
    """The step of each row of out/metrics.jsonl."""
    return [r["step"] for r in read_metrics(out)]


def make_data(path, n=24, seed=1, noise=0.3):
    """n demo word problems as prompt/response JSONL, with noise in a fraction of them."""
    write_jsonl(demo.task(n, seed, noise), path)
    return Path(path)


def run_cli(args, cwd=None, **kw):
    """Run `python prift.py ARGS` as a user would, to its end; returns the CompletedProcess. (Other
    runners, which do what this one does not: Held below, a process stopped at a named point;
    test_run_dir.cli_process, a file-size limit and the peak memory; test_cuda.cli and
    test_report's, their own flags.)"""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / "prift.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        **kw,
    )


class Held:
    """`python prift.py ARGV` in a fresh process that stops at a named point until the test lets it
    go, so that a signal or a kill lands in a known state however fast the machine is (no sleep,
    no polling). at=(kind, regex), nth: where it stops (tests/tools/hold.py: the nth import of a
    module, write to a file or rename onto a path that regex finds). Its stdout and stderr go to
    files, so that it never waits for the test to read them.

        with Held(argv, ("write", r"/metrics\\.jsonl$"), nth=2) as held:
            assert held.reached(), held.finish()   # False: it ended without getting there
            held.proc.send_signal(signal.SIGINT)
            held.release()
            rc, out, err = held.finish()
    """

    def __init__(self, argv, at, nth=1, env=None):
        import subprocess
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="prift-held-"))
        shutil.copy(ROOT / "tests" / "tools" / "hold.py", self.dir / "sitecustomize.py")
        ready, self.ready = os.pipe()[::-1]  # (write end for the process, read end for the test)
        self.go, go = os.pipe()[::-1]
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join([str(self.dir), *filter(None, [env.get("PYTHONPATH")])])
        env["PRIFT_TEST_HOLD"] = json.dumps({"ready": ready, "go": go, "at": at, "nth": nth})
        # Ctrl-C as in a terminal even where this process was started ignoring it (nohup, `&`):
        # an ignored signal stays ignored across exec, a handled one goes back to its default
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with open(self.dir / "stdout", "w") as out, open(self.dir / "stderr", "w") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, str(ROOT / "prift.py"), *map(str, argv)],
                    env=env,
                    stdout=out,
                    stderr=err,
                    pass_fds=(ready, go),
                )
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.close(ready)
            os.close(go)

    def reached(self):
        """Wait until the process stops where it was told (True) or ends without getting there."""
        return os.read(self.ready, 1) == b"!"

    def release(self):
        """Let the process go on from where it stopped."""
        if self.go is not None:
            os.close(self.go)
            self.go = None

    def finish(self):
        """Let it go, wait for its end: (exit code, stdout, stderr)."""
        self.release()
        rc = self.proc.wait()
        return rc, *((self.dir / n).read_text(errors="replace") for n in ("stdout", "stderr"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()
        os.close(self.ready)
        shutil.rmtree(self.dir, ignore_errors=True)


def trained_inputs(tmp_path_factory):
    """A checkpoint pretrained 20 steps (so that profit keeps some tokens, not none) and 24
    examples: (checkpoint, data), for a module-scoped fixture."""
    root = tmp_path_factory.mktemp("assets")
    return make_checkpoint(root / "ck", pretrain_steps=20), make_data(root / "train.jsonl", n=24)


def short_inputs(tmp_path_factory):
    """An untrained checkpoint and 12 examples: (checkpoint, data), for a module-scoped fixture."""
    root = tmp_path_factory.mktemp("assets")
    return make_checkpoint(root / "ck"), make_data(root / "train.jsonl", n=12)


def run_interrupted(w, argv, at_step, monkeypatch, signum=signal.SIGTERM):
    """infra.cli.main(argv) with the signal (SIGTERM unless told) sent to this process during step
    `at_step` (1-based)."""
    import prift

    get_lr = prift.get_lr

    def hook(step, *a, **k):
        if step == at_step - 1:
            os.kill(os.getpid(), signum)
        return get_lr(step, *a, **k)

    monkeypatch.setattr(prift, "get_lr", hook)
    rc = main_rc(argv)
    monkeypatch.setattr(prift, "get_lr", get_lr)
    return rc


# --------------------------------------------------------------------------------------------------
# Run directories: a fresh copy of a run's inputs, infra.cli.main in this process, and what it left
# on disk


class Work:
    """A fresh copy of a tiny checkpoint and its data (assets: their paths) in tmp; `out` does not
    exist yet. flags: the command line's defaults for this test file."""

    def __init__(self, tmp, assets, **flags):
        self.root, self.flags = tmp, flags
        self.ck = Path(shutil.copytree(assets[0], tmp / "ck"))
        self.data = Path(shutil.copy(assets[1], tmp / "train.jsonl"))
        self.out, self.cache = tmp / "out", tmp / "cache"

    def argv(self, *extra, **over):
        """The command line of a short run; keyword arguments replace a flag's value (None drops
        it).
        """
        flags = {
            "model": self.ck,
            "data": self.data,
            "out": self.out,
            "cache": self.cache,
            **self.flags,
            **over,
        }
        return [
            a
            for k, v in flags.items()
            if v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))
        ] + [str(e) for e in extra]

    def finished(self, out=None, **over):
        """A finished run in out (default self.out), made by prift."""
        assert main_rc(self.argv(out=out or self.out, **over)) == 0
        return out or self.out


def cli_env(w):
    """The environment of a command line of the run directory w: its prior cache, one thread."""
    return {**os.environ, "PRIFT_CACHE": str(w.cache), "OMP_NUM_THREADS": "1"}


def rewrite_config(ck, **change):
    """ck/config.json with the fields of change set, or removed where change gives None."""
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(change)
    (ck / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def loaded(path):
    """A safetensors file's tensors, copied out of its memory map (the file may be rewritten
    next)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(path).items()}


def weights(path):
    """The tensors of path/model.safetensors."""
    return loaded(Path(path) / "model.safetensors")


def same_weights(a, b):
    """The runs (or checkpoints) a and b hold the same tensors, bit for bit."""
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Seconds after which a guard fails a test that provokes a hang (an endless template, a FIFO, a
# device): far past what any of them takes on a loaded machine, so that the guard never decides
# whether a behaviour passes; it only keeps a hang from holding the suite forever.
HANG = 1800


@contextlib.contextmanager
def within(seconds=HANG):
    """Fail (TimeoutError) instead of hanging: what a FIFO or an endless template would do. A guard
    only (HANG): never a measure of speed. A FIFO opened blocking fails at once with
    never_waits_on."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def never_waits_on(*fifos, pid=None):
    """The block fails, at once instead of never, where it opens one of `fifos` blocking, which
    waits until someone opens the other end: tests/tools/fifo_watch.py watches whether process pid
    (default: this one) sleeps so; once it does, it opens the other end of each FIFO so that the
    block goes on, and the block fails. The process's state decides, not a clock."""
    import subprocess

    if not fifos:
        yield
        return
    watch = ROOT / "tests" / "tools" / "fifo_watch.py"
    watcher = subprocess.Popen(
        [sys.executable, str(watch), str(pid or os.getpid()), *map(str, fifos)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield
    finally:
        waited = watcher.communicate("")[0]  # its stdin closed: it stops watching
        if waited:  # replaces what the block raised, if anything: the first cause
            raise AssertionError(f"opened blocking, it waited for the other end of {fifos}")


def refused(argv, root, capsys, *fragments, entry=None, prog="prift", seconds=None):
    """argv is refused: exit code 2, one line holding every fragment, nothing under root written or
    removed. seconds: fail instead of hanging after that long (None: no limit)."""
    before = snapshot(root)
    with within(seconds) if seconds else contextlib.nullcontext():
        rc = main_rc(argv, entry)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}\nstdout: {out}\nstderr: {err}"
    line = one_error_line(err, prog)
    assert all(f in line for f in fragments), (fragments, line)
    assert snapshot(root) == before, "a refused input wrote, changed or removed files"
    return line


def main_rc(argv, entry=None):
    """infra.cli.main (or entry), what `python prift.py` runs: its return value, or the code it
    exits with."""
    from infra import cli

    try:
        return (entry or cli.main)([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def snapshot(root):
    """Every path under root with its content hash (size, for a huge file) and modification time:
    any write or removal shows."""
    snap = {}
    for p in sorted(Path(root).rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            snap[key] = ("link", os.readlink(p))
        elif p.is_fifo():
            snap[key] = "fifo"
        elif p.is_file() and p.stat().st_size > 2**26:  # a huge (sparse) test file: not read
            snap[key] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_file():
            snap[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            snap[key] = "dir"
    return snap


def one_error_line(err, prog="prift"):
    """The single line a user error prints on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so no `except Exception` in the code under test
    catches it.
    """


def kill_at_line(n, fn, *args, count=None):
    """Run fn(*args), raising Killed before the n-th line executed in infra/rundir.py (n None:
    never); returns True if fn finished first. count: a list whose [0] counts the lines executed.
    (Lines of infra/hf.py's save_model only write into a temporary directory.)"""
    from infra import rundir

    count = [0] if count is None else count

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == n:
                raise Killed
        return local

    sys.settrace(
        lambda frame, event, arg: local if frame.f_code.co_filename == rundir.__file__ else None
    )
    try:
        fn(*args)
        return True
    except Killed:
        return False
    finally:
        sys.settrace(None)


# --------------------------------------------------------------------------------------------------
# The method's entry points called as infra/cli.py calls them, from a test's namespace of settings


def settings(args):
    """The namespace with the rule's own signal and threshold filled in, as check_args does."""
    signal, threshold, _ = prift.rule_settings(args.rule, args.signal, args.threshold)
    return argparse.Namespace(**{**vars(args), "signal": signal, "threshold": threshold})


def train(args, model, seqs, prior=None, ref=None, out=None, start=None):
    """prift.train as infra/cli.py calls it: a TrainConfig of these settings, the model cast and
    wrapped as a run does, and the run kept in `out` (or nowhere)."""
    from infra import rundir
    from infra.cli import train_config
    from infra.distributed import wrap_distributed

    cfg = train_config(args)
    if cfg.match_authors:  # bf16 weights and AdamW state, before DDP or FSDP2 see them
        model.to(torch.bfloat16)
    fsdp, recompute = getattr(args, "fsdp", False), getattr(args, "grad_checkpoint", None)
    wrapped = wrap_distributed(model, ref, fsdp, recompute)
    run = rundir.Run(out, getattr(args, "save_every", 0), start)
    with run.interrupts():
        return prift.train(cfg, wrapped, seqs, prior=prior, ref=ref, run=run)


def prior_source(args):
    """The reference.PriorSource of a test's namespace, as the command line picks it."""
    from infra.cli import pick
    from infra.reference import PriorSource

    return pick(PriorSource, args)


def compute_prior(args, seqs, device):
    """The prior of seqs as a run gets it: from the cache, or computed and kept there."""
    from infra.reference import prior_of

    return prior_of(seqs, device, prior_source(args))


def load_reference(args, device):
    from infra.reference import load_reference

    return load_reference(args.ref, device, prior_source(args).dtype)


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoints of each family, made with transformers (an independent oracle)


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")
VOCAB = 96

# Tiny configs. The llama-style ones use GQA (2 key/value heads for 4 query heads); qwen3 sets
# head_dim to
# 16, which is not hidden_size / num_attention_heads (8).
TINY = {
    "gpt2": dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    ),
    "llama": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def hf_config(family, **overrides):
    import transformers

    cls = {
        "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    return cls(**{**TINY[family], **overrides})


@torch.no_grad()
def randomize_(model, seed=0):
    """Replace the (tiny, std 0.02) default init with weights large enough that logits are O(1), and
    make norm gains and biases non-trivial, so that a wrong norm, bias, rotation or mask shows in
    the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.dim() == 1 and ("norm" in name or ".ln_" in name):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_hf_checkpoint(path, family, *, save_dtype=None, max_shard_size=None, seed=0, **overrides):
    """Build a tiny random transformers model of `family` (config: TINY[family] updated with
    `overrides`, e.g. tie_word_embeddings=True or rope_parameters={...}), save it with transformers'
    save_pretrained into `path` (created if needed) and return `path`. save_dtype (e.g.
    torch.bfloat16) casts the weights before saving; max_shard_size (e.g. "40KB") makes a sharded
    checkpoint with an index."""
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    randomize_(model, seed).eval()
    if save_dtype is not None:
        model = model.to(save_dtype)
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kw)
    return path


def load_hf(path, dtype=torch.float32):
    """The transformers model stored in `path`, in `dtype` (float32 unless told), in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def hf_logits(path, idx, dtype=torch.float32):
    return load_hf(path, dtype)(idx).logits


def write_tokenizer(path):
    """A small word-level tokenizer.json (no download), written into `path`; returns the file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = Path(path) / "tokenizer.json"
    tok.save(str(out))
    return out


# A real instruct checkpoint's chat template (SmolLM2-Instruct's): chatml with a default system
# prompt, so that even a prompt without a system turn holds <|im_end|> twice before the response.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_chat_checkpoint(
    path, family="llama", *, pad="end", tie=True, vocab_size=None, hidden=32, layers=2, seed=0
):
    """A tiny checkpoint with the traps of a real instruct one (SmolLM2-Instruct: tied embeddings,
    GQA, a chat template with a default system prompt, EOS <|im_end|>, and pad_token_id that same
    <|im_end|>, the end token prift trains and the template writes in every prompt). pad: "end"
    (that trap), "outside" (<|endoftext|>, which the template never writes) or None (no
    pad_token_id). vocab_size: rows of the embedding beyond the tokenizer's (a real-size
    vocabulary, as Qwen's 151,936 rows for 151,665 tokens), default the tokenizer's. Built and saved
    with transformers, weights as randomize_ makes them; returns `path`."""
    import transformers

    from infra import demo

    path = Path(path)
    texts = [r["response"] for r in demo.pretrain_corpus(300, seed=0)]
    tok = demo.tokenizer(texts, vocab_size=120)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    end = tok.token_to_id("<|im_end|>")
    pad_id = {"end": end, "outside": tok.token_to_id("<|endoftext|>"), None: None}[pad]
    vocab = max(vocab_size or 0, tok.get_vocab_size())
    ids = dict(vocab_size=vocab, bos_token_id=end, eos_token_id=end, pad_token_id=pad_id)
    if family == "gpt2":
        cfg = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    else:
        cfg = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA
            max_position_embeddings=256,
        )
        if family == "qwen3":
            cfg["head_dim"] = hidden // 2  # not hidden / heads, as in Qwen3
    config = transformers.AutoConfig.for_model(family, tie_word_embeddings=tie, **cfg, **ids)
    torch.manual_seed(seed)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(config), seed).eval()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    special = dict(eos_token="<|im_end|>", bos_token=None, unk_token="<unk>")
    if pad:
        special["pad_token"] = tok.id_to_token(pad_id)
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                special,
                tokenizer_class="PreTrainedTokenizerFast",
                chat_template=DEFAULT_SYSTEM_TEMPLATE,
            )
        )
    )
    return path
