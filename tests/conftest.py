"""The tests' environment (no hub access, one thread) and their pytest fixtures; the helpers they
use are in helpers.py."""

import os
import sys
from pathlib import Path

# Before transformers is imported: no hub access, no progress bars, no advisory warnings.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The command-line runs the tests start inherit one intra-op thread too (see torch.set_num_threads
# below).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `import model` works
sys.path.insert(0, str(ROOT / "tests" / "tools"))  # the tools the tests use (browser_check, ...)
# and so that the command lines the tests start (`python -m infra.evaluate`, ...) find the package
# from any cwd
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import VOCAB, make_hf_checkpoint  # noqa: E402

# One intra-op thread: these models are tiny, and on a 2-core machine with anything else running,
# torch's
# default of one thread per core makes the per-token generation loops spin-wait (10 s became 3
# minutes).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """prift.train installs SIGINT/SIGTERM handlers (checkpoint and stop); give pytest its own
    back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture(name="make_hf_checkpoint")
def make_hf_checkpoint_fixture():
    """make_hf_checkpoint(tmp_path, family, **overrides) -> checkpoint directory (see the
    function)."""
    return make_hf_checkpoint


@pytest.fixture
def idx():
    """A batch of 2 sequences of 40 token ids: longer than the llama3 test's original context of
    16."""
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1234))
