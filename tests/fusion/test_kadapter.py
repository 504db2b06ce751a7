"""K-Adapter (fusion/kadapter.py): frozen backbone, layer taps, residual chain, heads, variants."""

from __future__ import annotations

import random

import pytest
import torch

from fusion.models.backbone import TextBackbone, load_backbone, random_backbone
from fusion.models.kadapter import EntityTyper, KAdapter, KAdapterConfig, RelationClassifier, RelationExample, TypingExample, default_layers, relation_batch, typing_batch

H = 32  # the tiny backbone's hidden size


def kadapter_tiny(backbone: TextBackbone, adapters=("factual", "lexical")) -> KAdapter:
    """Adapter width 16, 2 heads, over a hidden-32 random backbone."""
    return KAdapter(backbone.model, KAdapterConfig(tuple(adapters), adapter_size=16, num_heads=2,
                                                   intermediate_size=32))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, and on a busy
    2-core machine OpenMP's spin-waiting made a training step 40x slower (2 s instead of 0.05 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def span(text: str, word: str, nth: int = 0) -> tuple[int, int]:
    start = -1
    for _ in range(nth + 1):
        start = text.index(word, start + 1)
    return start, start + len(word)


# ------------------------------------------------------------------------------ frozen backbone

def test_backbone_frozen_and_only_the_trained_adapter_and_head_change(backbone, tokenizer):
    torch.manual_seed(0)
    model = kadapter_tiny(backbone)
    model.train_only("factual")
    clf = RelationClassifier(model, num_relations=3, adapters=("factual",))
    examples = [RelationExample(t, span(t, "tim"), span(t, "apple"), i % 3)
                for i, t in enumerate(["tim cook is the ceo of apple", "apple was founded by tim",
                                       "tim is visiting apple in paris"])]
    batch, skipped = relation_batch(examples, tokenizer)
    assert skipped.kept == 3 and skipped.total == 0
    before = snapshot(clf)
    # every parameter goes to the optimiser, backbone included: freezing must not rely on the caller
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, weight_decay=0.01)
    clf.train()
    for _ in range(4):
        opt.zero_grad()
        clf.loss(batch)["total"].backward()
        opt.step()
    after = snapshot(clf)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("encoder.backbone.") for k in changed)
    assert not any(k.startswith("encoder.adapters.lexical.") for k in changed)
    trained = {k for k in before if k.startswith(("encoder.adapters.factual.", "classifier."))}
    assert changed == trained
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_backbone_and_frozen_adapters_stay_in_eval_mode(backbone, tokenizer):
    model = kadapter_tiny(backbone).train_only("factual")
    model.train()
    assert model.training and model.adapters["factual"].training
    assert not any(m.training for m in model.backbone.modules())       # its dropout is off
    assert not any(m.training for m in model.adapters["lexical"].modules())
    ids, mask = encode(tokenizer, ["tim cook is visiting beijing now", "apple ceo"])
    torch.manual_seed(1)
    a = model(ids, mask)
    torch.manual_seed(2)
    b = model(ids, mask)
    assert torch.equal(a[..., :H], b[..., :H])                # backbone: deterministic in train mode
    assert torch.equal(a[..., 2 * H:], b[..., 2 * H:])        # frozen lexical adapter too
    assert not torch.equal(a[..., H:2 * H], b[..., H:2 * H])  # the trained one has dropout on


# ------------------------------------------------------------------------------- layer selection

def test_default_layers_first_middle_last():
    assert default_layers(6) == (1, 4, 6)   # after layers 0, 3, 5 counted from 0
    assert default_layers(24) == (1, 13, 24)
    assert default_layers(2) == (1, 2, 2)


@pytest.mark.parametrize("layers", [None, (0, 2, 3), (4,)])
def test_adapter_layer_j_receives_hidden_states_of_its_chosen_layer(tokenizer, layers):
    bb = random_backbone(tokenizer, num_layers=4, max_position=64)
    cfg = KAdapterConfig(("factual",), layers=layers, adapter_size=16, num_heads=2)
    model = KAdapter(bb.model, cfg).eval()
    chosen = layers or (1, 3, 4)
    assert model.layers == chosen
    seen_in, seen_out = [], []
    for block in model.adapters["factual"].blocks:
        block.register_forward_pre_hook(lambda mod, args: seen_in.append(args))
        block.register_forward_hook(lambda mod, args, out: seen_out.append(out))
    ids, mask = encode(tokenizer, ["tim cook is visiting beijing now", "the capital of china"])
    features = model(ids, mask)
    with torch.no_grad():
        reference = bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(reference) == 5 and len(seen_in) == len(chosen)
    for j, (index, (state, previous, padding)) in enumerate(zip(chosen, seen_in)):
        assert torch.equal(state, reference[index])
        assert previous is None if j == 0 else previous is seen_out[j - 1]
        assert torch.equal(padding, mask == 0)
    assert torch.equal(features[..., H:], seen_out[-1])
    assert torch.equal(features[..., :H], reference[-1])


def test_layers_out_of_range_are_refused(backbone):
    with pytest.raises(ValueError, match="hidden_states 0..2"):
        KAdapter(backbone.model, KAdapterConfig(layers=(0, 3), adapter_size=16, num_heads=2))


# ---------------------------------------------------------------------------- residual structure

def test_zero_up_projection_makes_each_adapter_layer_the_identity(backbone, tokenizer):
    """a_j = x_j + W_up(...): with W_up = 0 and b_up = 0 the layer returns x_j bit for bit, so the
    adapter's output is the chained sum h_{l3} + (h_{l2} + h_{l1})."""
    model = kadapter_tiny(backbone).eval()
    adapter = model.adapters["factual"]
    for block in adapter.blocks:
        torch.nn.init.zeros_(block.up.weight)
        torch.nn.init.zeros_(block.up.bias)
    ids, mask = encode(tokenizer, ["tim cook is visiting beijing now", "apple"])
    out = model(ids, mask, adapters=("factual",))[..., H:]
    with torch.no_grad():
        hs = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    l1, l2, l3 = model.layers
    assert torch.equal(out, hs[l3] + (hs[l2] + hs[l1]))
    # reset_parameters restores the near-identity initialisation (std 2e-4, zero bias)
    model.reset_parameters()
    for block in adapter.blocks:
        assert block.up.weight.abs().max() > 0 and block.up.weight.std() < 1e-3
        assert torch.equal(block.up.bias, torch.zeros_like(block.up.bias))


def test_fresh_adapter_is_close_to_the_identity(backbone, tokenizer):
    model = kadapter_tiny(backbone).eval()
    ids, mask = encode(tokenizer, ["tim cook is visiting beijing now"])
    out = model(ids, mask, adapters=("factual",))[..., H:]
    with torch.no_grad():
        hs = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    l1, l2, l3 = model.layers
    chain = hs[l3] + (hs[l2] + hs[l1])
    assert (out - chain).abs().max() < 1e-2 * chain.abs().max()
    assert not torch.equal(out, chain)


# ------------------------------------------------------------------------ width, adapter choice

def test_output_width_and_adapter_selection(backbone, tokenizer):
    model = KAdapter(backbone.model, KAdapterConfig(("factual", "lexical", "third"), adapter_size=16,
                                                    num_heads=2))
    ids, mask = encode(tokenizer, ["tim cook is visiting beijing now", "apple"])
    assert model(ids, mask).shape == (2, ids.shape[1], H * 4)
    assert model.feature_size() == H * 4
    sub = model(ids, mask, adapters=("lexical",))
    assert sub.shape == (2, ids.shape[1], H * 2)
    model.eval()
    assert torch.equal(model(ids, mask)[..., 2 * H:3 * H], model(ids, mask, adapters=("lexical",))[..., H:])
    with pytest.raises(KeyError, match="unknown adapters"):
        model(ids, mask, adapters=("linguistic",))
    text = repr(model)
    assert "hidden_size=32" in text and "adapter_size=16" in text and "layers=(1, 2, 2)" in text


def test_training_one_adapter_leaves_the_other_unchanged(backbone, tokenizer):
    torch.manual_seed(0)
    model = kadapter_tiny(backbone)
    typer = EntityTyper(model, num_types=4)  # reads [h_L ; factual ; lexical]
    model.train_only("lexical")
    examples = [TypingExample("paris is a city", (0, 5), 0), TypingExample("the dog ran", (4, 7), 2)]
    batch, _ = typing_batch(examples, tokenizer)
    factual = snapshot(model.adapters["factual"])
    lexical = snapshot(model.adapters["lexical"])
    opt = torch.optim.Adam(typer.parameters(), lr=1e-3)
    typer.train()
    for _ in range(3):
        opt.zero_grad()
        typer.loss(batch)["total"].backward()
        opt.step()
    assert all(torch.equal(v, model.adapters["factual"].state_dict()[k]) for k, v in factual.items())
    assert not all(torch.equal(v, model.adapters["lexical"].state_dict()[k]) for k, v in lexical.items())
    model.train_only()  # freeze every adapter: only a head would train
    assert not any(p.requires_grad for p in model.parameters())


# -------------------------------------------------------------------------------------- heads

def train(task: torch.nn.Module, batch: dict, steps: int = 40, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=lr)
    task.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(batch)
        assert set(loss) == {"task", "total"}
        loss["total"].backward()
        opt.step()
        losses.append(loss["total"].item())
    return losses


def test_relation_head_learns_which_word_is_the_tail(backbone, tokenizer):
    """Label = the tail word's identity among three cities, with the head and the tail placed
    either way round in varied sentences."""
    rng = random.Random(0)
    cities, others = ["paris", "london", "berlin"], ["tim", "apple", "steve", "china"]
    examples = []
    for i in range(24):
        tail, head = cities[i % 3], rng.choice(others)
        a, b = (head, tail) if rng.random() < 0.5 else (tail, head)
        text = f"{a} {rng.choice(['is in', 'was born in', 'and'])} {b}"
        examples.append(RelationExample(text, span(text, head), span(text, tail), i % 3))
    torch.manual_seed(0)
    task = RelationClassifier(kadapter_tiny(backbone).train_only("factual"), 3, adapters=("factual",))
    batch, skipped = relation_batch(examples, tokenizer)
    assert skipped.kept == 24
    losses = train(task, batch)
    assert losses[-1] < 0.3 * losses[0], losses


def test_entity_typing_head_learns_types(backbone, tokenizer):
    rng = random.Random(0)
    types = [["paris", "london", "berlin"], ["france", "england", "germany"], ["dog", "cat"],
             ["red", "green", "blue"]]
    examples = []
    for i in range(24):
        word = rng.choice(types[i % 4])
        before = rng.choice(["he has", "this is", "they were at"])
        after = rng.choice(["now", "in a city", ""])
        text = f"{before} {word} {after}"
        examples.append(TypingExample(text, span(text, word), i % 4))
    torch.manual_seed(0)
    task = EntityTyper(kadapter_tiny(backbone).train_only("lexical"), 4, adapters=("lexical",))
    batch, skipped = typing_batch(examples, tokenizer)
    assert skipped.kept == 24
    losses = train(task, batch)
    assert losses[-1] < 0.3 * losses[0], losses


def test_builders_count_and_skip_bad_inputs(tokenizer):
    long_text = "tim " * 20 + "apple"  # the mention lies beyond max_length
    examples = [
        RelationExample("tim cook is the ceo of apple", (0, 3), (22, 27), 1),
        RelationExample("", (0, 0), (0, 0), 0),                     # empty text
        RelationExample("   ", (0, 1), (1, 2), 0),                  # whitespace only
        RelationExample("tim cook", (0, 3), (5, 40), 0),            # span past the end
        RelationExample("tim  cook", (0, 3), (3, 5), 0),            # span over whitespace only
        RelationExample(long_text, (0, 3), span(long_text, "apple"), 2),  # truncated away
        RelationExample("apple was founded by steve jobs", (21, 26), (0, 5), 0),
    ]
    batch, skipped = relation_batch(examples, tokenizer, max_length=10)
    assert (skipped.kept, skipped.empty_text, skipped.bad_span, skipped.truncated) == (2, 2, 2, 1)
    assert skipped.kept_index == [0, 6] and skipped.total == 5
    assert batch["labels"].tolist() == [1, 0]
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    assert [tokens[0][batch["head_index"][0]], tokens[0][batch["tail_index"][0]]] == ["tim", "apple"]
    assert [tokens[1][batch["head_index"][1]], tokens[1][batch["tail_index"][1]]] == ["steve", "apple"]
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())

    dropped = [TypingExample("", (0, 1), 0), TypingExample(long_text, span(long_text, "apple"), 1)]
    none, skipped = typing_batch(dropped, tokenizer, max_length=8)
    assert none is None and (skipped.empty_text, skipped.truncated, skipped.kept) == (1, 1, 0)

    multi, _ = typing_batch([TypingExample("paris is a city", (0, 5), (0, 2)),
                             TypingExample("the dog", (4, 7), 1)], tokenizer, num_types=3)
    assert multi["labels"].tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    task = EntityTyper(kadapter_tiny(random_backbone(tokenizer, max_position=64)), 3)
    assert torch.isfinite(task.loss(multi)["total"])


# ---------------------------------------------------------------------------------- variants

def test_minilm_variant_runs_one_sentence(minilm_path):
    bb = load_backbone(str(minilm_path))
    model = KAdapter(bb.model).eval()          # the defaults: width 128, 4 heads, feed-forward 512
    assert model.layers == (1, 4, 6) and model.cfg.adapter_size == 128
    assert (model.cfg.num_heads, model.cfg.intermediate_size) == (4, 512)
    enc = bb.tokenizer(["Tim Cook is visiting Beijing now."], return_tensors="pt")
    features = model(enc["input_ids"], enc["attention_mask"])
    assert features.shape == (1, enc["input_ids"].shape[1], 384 * 3)
    assert torch.isfinite(features).all()
    text = "Tim Cook is visiting Beijing now."
    batch, skipped = relation_batch([RelationExample(text, (0, 8), (21, 28), 0)], bb.tokenizer)
    logits = RelationClassifier(model, 5).eval()(batch["input_ids"], batch["attention_mask"],
                                                 batch["head_index"], batch["tail_index"])
    assert logits.shape == (1, 5) and skipped.kept == 1
