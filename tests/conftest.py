"""Shared fixtures: tiny randomly initialised encoders and causal LMs (width 32) saved with a real tokenizer,
synthetic traces, and the GLUE data folder that sits beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

# The suite's models are width 32: their matrix products are too small to split across threads, and on a 2-core
# machine a second OpenMP thread mostly spins (two test files took 109 s at 2 threads, 15 s at 1, on a busy 2-core
# CPU). One thread for this process and every CLI it starts; a test that sets `threads=` still gets its count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("EXITRL_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "glue"))
WORDS = ("the a an is was not no yes it this that and or of to in on for with by he she they we you i good bad "
         "film movie great awful story said has had be are were will would can could").split()


def save_tiny_encoder(folder: Path, model_type: str = "bert", num_layers: int = 3, seed: int = 0) -> Path:
    """A width-32 encoder with random weights and a small WordPiece vocabulary, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,'\"!?-",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=160, type_vocab_size=2 if model_type == "bert" else 1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_lm(folder: Path, family: str = "llama", num_layers: int = 3, seed: int = 0) -> Path:
    """A width-32 causal LM with random weights and the same small vocabulary (its [SEP] joins documents),
    saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,'\"!?-",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    sizes = {"vocab_size": len(vocab), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=num_layers, n_head=4, n_positions=160, **sizes)
    else:
        config = AutoConfig.for_model(family, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                                      **sizes)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "RTE" / "train.tsv").is_file():
        pytest.fail(f"GLUE data not found at {GLUE_DIR}; set EXITRL_TEST_DATA_DIR to a GLUE-layout folder.")
    return GLUE_DIR


def synthetic_trace(n: int = 2000, num_layers: int = 4, hidden: int = 16, seed: int = 0, easy_fraction: float = 0.5):
    """A trace whose best exit policy is known: 'easy' examples (marked by state feature 0) are predicted
    correctly and confidently by every head; 'hard' ones only by the last head."""
    from exitrl.traces.trace import SplitTrace

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    easy = torch.rand(n, generator=g) < easy_fraction
    states = torch.randn(n, num_layers, hidden, generator=g)
    states[:, :, 0] += torch.where(easy, 2.0, -2.0)[:, None]
    sign = torch.where(labels == 1, 1.0, -1.0)
    logits = torch.zeros(n, num_layers, 2)
    for layer in range(num_layers):
        good = easy | (layer == num_layers - 1)
        logits[:, layer, 1] = torch.where(good, 3 * sign, -3 * sign)
    return SplitTrace.from_logits(states, logits, labels), easy


@pytest.fixture(scope="session")
def reference_numbers(tmp_path_factory):
    """`numbers` of an uninterrupted run, by its overrides; each distinct run happens once a session (the resume
    tests of two stages and the determinism test compare against the same uninterrupted run)."""
    done: dict[tuple[str, ...], dict] = {}

    def get(overrides: list[str]) -> dict:
        from test_cli import run_cli
        from test_resume import numbers

        if tuple(overrides) not in done:
            folder = tmp_path_factory.mktemp("reference")
            out = run_cli(folder, *overrides)
            assert out.returncode == 0, out.stderr[-3000:]
            done[tuple(overrides)] = numbers(folder / "run")
        return done[tuple(overrides)]

    return get
