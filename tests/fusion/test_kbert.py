"""K-BERT: the sentence tree of the paper's example worked by hand, truncation and counts, the visible
matrix as the model really applies it (outputs that must not move when an invisible token changes),
soft positions, MLM on the trunk only, and the MiniLM variant."""

from __future__ import annotations

import pytest
import torch

from fusion.models.backbone import load_backbone, random_backbone
from fusion.models.kbert import KBert, KBertConfig, KnowledgeLayer, TripleLookup, collate_trees, visible_bias
from fusion.models.objectives import IGNORE

TEXT = "Tim Cook is visiting Beijing now"
MENTIONS = [(0, 8, 0), (21, 28, 1)]        # "Tim Cook" -> entity 0, "Beijing" -> entity 1
TRIPLES = [(0, "ceo", "apple"), (1, "capital", "china"), (1, "is_a", "city")]

# The paper's running example, in wordpieces ("is_a" reads "is a": "city" sits one further than in
# the paper).
PAPER_TOKENS = ["[CLS]", "tim", "cook", "ceo", "apple", "is", "visiting", "beijing",
                "capital", "china", "is", "a", "city", "now", "[SEP]"]
PAPER_SOFT = [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6, 7, 8, 6, 7]
PAPER_TRUNK = [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
# Row i, column j: 1 when token i sees token j. Trunk sees trunk; "tim cook" also sees "ceo apple",
# "beijing" sees both its branches; a branch sees itself and its entity's wordpieces.
PAPER_VISIBLE = """
    [CLS]    111..111.....11
    tim      11111111.....11
    cook     11111111.....11
    ceo      .1111..........
    apple    .1111..........
    is       111..111.....11
    visiting 111..111.....11
    beijing  111..1111111111
    capital  .......111.....
    china    .......111.....
    is       .......1..111..
    a        .......1..111..
    city     .......1..111..
    now      111..111.....11
    [SEP]    111..111.....11
"""


def kbert_tiny(tokenizer, seed: int = 0, **config) -> KBert:
    """A random 2-layer BERT, hidden 32, over ``tokenizer``; trees up to 64 tokens."""
    backbone = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, max_position=128, seed=seed)
    return KBert(backbone, KBertConfig(**{"max_length": 64, **config}))


def grid(table: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.split()[1]] for line in table.strip().splitlines()])


def tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids.tolist())


@pytest.fixture()
def layer(tokenizer) -> KnowledgeLayer:
    return KnowledgeLayer(tokenizer, TripleLookup(TRIPLES), k=2, max_length=64)


def paper_batch(layer: KnowledgeLayer) -> dict[str, torch.Tensor]:
    return collate_trees([layer(TEXT, MENTIONS)])


# --- knowledge layer --------------------------------------------------------------------------------

def test_paper_example_tree(tokenizer, layer):
    tree = layer(TEXT, MENTIONS)
    assert tokens(tokenizer, tree.input_ids) == PAPER_TOKENS
    assert tree.position_ids.tolist() == PAPER_SOFT
    assert tree.trunk.int().tolist() == PAPER_TRUNK
    assert torch.equal(tree.visible, grid(PAPER_VISIBLE))
    assert tree.token_type_ids.tolist() == [0] * 15
    assert tree.special.nonzero().flatten().tolist() == [0, 14]
    assert (tree.injected, tree.dropped, tree.without_triples, tree.unaligned) == (3, 0, 0, 0)


def test_link_mentions_are_accepted(tokenizer, layer):
    link = pytest.importorskip("knowledge.link")
    mentions = [link.Mention(0, 8, "Tim Cook", 0, "e:0", 1.0, 1),
                link.Mention(21, 28, "Beijing", 1, "e:1", 1.0, 1)]
    assert torch.equal(layer(TEXT, mentions).input_ids, layer(TEXT, MENTIONS).input_ids)


def test_k_limits_triples_per_entity(tokenizer):
    k1 = KnowledgeLayer(tokenizer, TripleLookup(TRIPLES), k=1)(TEXT, MENTIONS)
    assert tokens(tokenizer, k1.input_ids) == ["[CLS]", "tim", "cook", "ceo", "apple", "is", "visiting",
                                               "beijing", "capital", "china", "now", "[SEP]"]
    assert k1.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6, 7]
    assert (k1.injected, k1.dropped) == (2, 0)
    k0 = KnowledgeLayer(tokenizer, TripleLookup(TRIPLES), k=0)(TEXT, MENTIONS)
    assert k0.input_ids.tolist() == tokenizer(TEXT)["input_ids"]
    assert (k0.injected, k0.without_triples) == (0, 0)      # k=0 is a choice, not missing knowledge


@pytest.mark.parametrize("max_length, kept, trunk_words", [
    (15, ["ceo apple", "capital china", "is a city"], 6),   # fits exactly
    (14, ["ceo apple", "capital china"], 6),                # the last branch goes first
    (12, ["ceo apple", "capital china"], 6),
    (11, ["ceo apple"], 6),                                 # whole branches only, in order
    (8, [], 6),                                             # trunk alone
    (6, [], 4),                                             # only now is the trunk cut
    (2, [], 0),
])
def test_branches_truncated_before_trunk(tokenizer, max_length, kept, trunk_words):
    tree = KnowledgeLayer(tokenizer, TripleLookup(TRIPLES), k=2, max_length=max_length)(TEXT, MENTIONS)
    words = ["tim", "cook", "is", "visiting", "beijing", "now"][:trunk_words]
    trunk = [t for t, is_trunk in zip(tokens(tokenizer, tree.input_ids), tree.trunk) if is_trunk]
    branch = " ".join(t for t, is_trunk in zip(tokens(tokenizer, tree.input_ids), tree.trunk)
                      if not is_trunk)
    assert trunk == ["[CLS]", *words, "[SEP]"]
    assert branch == " ".join(kept)
    assert len(tree) <= max_length
    assert (tree.injected, tree.dropped) == (len(kept), 3 - len(kept))
    assert tree.position_ids[tree.trunk].tolist() == list(range(trunk_words + 2))


def test_counts_mentions_without_triples_and_unaligned(tokenizer, layer):
    # "visiting" links to entity 7 (no triple), a span of one space covers no wordpiece
    tree = layer(TEXT, [*MENTIONS, (12, 20, 7), (8, 9, 0)])
    assert (tree.injected, tree.dropped, tree.without_triples, tree.unaligned) == (3, 0, 1, 1)
    assert tokens(tokenizer, tree.input_ids) == PAPER_TOKENS


def test_multi_wordpiece_mention_and_shuffled_mentions(tokenizer):
    # "cooks" is two wordpieces (cook ##s): the branch hangs after ##s and sees both
    lookup = TripleLookup([(3, "founded by", "steve jobs"), (4, "is_a", "city")])
    tree = KnowledgeLayer(tokenizer, lookup)("paris cooks", [(6, 11, 3), (0, 5, 4)])
    assert tokens(tokenizer, tree.input_ids) == ["[CLS]", "paris", "is", "a", "city", "cook", "##s",
                                                 "founded", "by", "steve", "jobs", "[SEP]"]
    assert tree.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 4]
    branch = slice(7, 11)
    assert tree.visible[branch, 5:7].all() and tree.visible[5:7, branch].all()
    assert not tree.visible[branch, 1].any() and not tree.visible[1, branch].any()


@pytest.mark.parametrize("text", ["", "the dog was red", "   "])
def test_no_mentions_is_plain_bert_input(tokenizer, layer, text):
    tree = layer(text, [])
    ids = tokenizer(text)["input_ids"]
    assert tree.input_ids.tolist() == ids
    assert tree.position_ids.tolist() == list(range(len(ids)))
    assert tree.visible.all() and tree.trunk.all()
    assert (tree.injected, tree.dropped, tree.without_triples) == (0, 0, 0)


def test_lookup_from_indices_keeps_order_and_drops_duplicates():
    lookup = TripleLookup.from_indices(heads=[1, 0, 1, 1], relations=[0, 1, 1, 0], tails=[2, 3, 2, 2],
                                       relation_names=["capital", "is_a"],
                                       entity_names=["beijing", "tim cook", "china", "city"])
    assert lookup.get(1) == [("capital", "china"), ("is a", "china")]
    assert lookup.get(1, k=1) == [("capital", "china")]
    assert lookup.get(0) == [("is a", "city")] and lookup.get(5) == [] and 5 not in lookup
    assert TripleLookup([(0, "is_a", "x")], underscores=False).get(0) == [("is_a", "x")]


def test_collate_pads_invisibly(tokenizer, layer):
    short, long = layer("the dog", []), layer(TEXT, MENTIONS)
    batch = collate_trees([short, long], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 15) and batch["visible"].shape == (2, 15, 15)
    n = len(short)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (15 - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert not batch["visible"][0, :n, n:].any()                    # no real token sees padding
    assert not batch["visible"][0, n:, :n].any()                    # padding sees no real token ...
    assert torch.equal(batch["visible"][0, n:, n:], torch.eye(15 - n, dtype=torch.bool))  # ... only itself
    assert not batch["trunk"][0, n:].any() and not batch["special"][0, n:].any()
    assert torch.equal(batch["visible"][1], long.visible)


# --- model: the visible matrix and soft positions as the backbone applies them ----------------------

def visible_bias_reference(visible: torch.Tensor) -> torch.Tensor:
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]


def test_visible_bias_is_additive():
    v = torch.tensor([[[True, False], [True, True]]])
    assert torch.equal(visible_bias(v, torch.float32), visible_bias_reference(v))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_invisible_tokens_do_not_reach_outputs(tokenizer, layer, attn, num_layers):
    """After n layers token i has read token j iff j is reachable in n steps of the visible matrix
    (V has its diagonal, so reach = V^n). Change each token's id in turn: outputs outside its reach must
    not move at all, outputs that see it directly must move. With one layer this says the trunk never
    sees a branch except through the branch's entity."""
    backbone = random_backbone(tokenizer, num_layers=num_layers, max_position=64)
    backbone.model.set_attn_implementation(attn)
    model = KBert(backbone, KBertConfig(max_length=64)).eval()
    batch = paper_batch(layer)
    v = batch["visible"][0].float()
    reach = torch.linalg.matrix_power(v, num_layers) > 0                # (L, L)
    with torch.no_grad():
        base = model.encode(batch).hidden[0]                            # (L, D)
        for j in range(v.shape[0]):
            ids = batch["input_ids"].clone()
            ids[0, j] = tokenizer.convert_tokens_to_ids("dog")
            out = model(ids, batch["position_ids"], batch["visible"], batch["token_type_ids"]).hidden[0]
            moved = (out - base).abs().amax(-1)                         # (L,)
            assert torch.all(moved[~reach[:, j]] <= 1e-6), (attn, j)
            assert torch.all(moved[v[:, j] > 0] > 1e-4), (attn, j)
    if num_layers == 1:  # the concrete claim: "apple" (a branch) moves "tim", "cook" and its branch only
        assert reach[:, 4].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_bool_mask_would_leak_under_eager(tokenizer, layer):
    """Why :func:`visible_bias` exists: eager attention adds a 4-D mask to the scores, so a bool mask
    there masks nothing (a change in an invisible token moves the trunk)."""
    backbone = random_backbone(tokenizer, num_layers=1, max_position=64)
    backbone.model.set_attn_implementation("eager")
    bert, batch = backbone.model.eval(), paper_batch(layer)
    ids = batch["input_ids"].clone()
    ids[0, 4] = tokenizer.convert_tokens_to_ids("dog")                  # "apple", invisible to "now"
    kw = dict(position_ids=batch["position_ids"], attention_mask=batch["visible"][:, None])
    with torch.no_grad():
        moved = (bert(ids, **kw).last_hidden_state - bert(batch["input_ids"], **kw).last_hidden_state)
    assert moved[0, 13].abs().max() > 1e-4


def test_soft_positions_reach_the_embeddings(tokenizer, layer, backbone):
    model = KBert(backbone, KBertConfig(max_length=64)).eval()
    batch = paper_batch(layer)
    seen = []
    hook = backbone.model.embeddings.position_embeddings.register_forward_hook(
        lambda module, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        model.encode(batch)
    hook.remove()
    assert seen and torch.equal(seen[0], torch.tensor([PAPER_SOFT]))


def test_one_layer_trunk_reads_the_sentence_as_plain_bert(tokenizer, layer):
    """Soft positions + visible matrix, end to end: with one layer, a trunk token that hangs no branch
    sees exactly the plain sentence at the plain positions, so its output is plain BERT's."""
    backbone = random_backbone(tokenizer, num_layers=1, max_position=64)
    model = KBert(backbone, KBertConfig(max_length=64)).eval()
    batch = paper_batch(layer)
    plain = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        tree_out = model.encode(batch).hidden[0]
        plain_out = backbone.model(**plain).last_hidden_state[0]
    trunk_idx = batch["trunk"][0].nonzero().flatten()                   # flat index of each plain token
    for plain_i, flat_i in enumerate(trunk_idx.tolist()):
        if PAPER_TOKENS[flat_i] not in ("tim", "cook", "beijing"):
            torch.testing.assert_close(tree_out[flat_i], plain_out[plain_i], rtol=0, atol=1e-5)


def test_no_mentions_equals_plain_backbone(tokenizer, layer, backbone):
    model = KBert(backbone, KBertConfig(max_length=64)).eval()
    texts = ["tim cook is visiting beijing now", "the dog"]
    batch = collate_trees([layer(t, []) for t in texts], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.encode(batch)
        for i, t in enumerate(texts):
            plain = backbone.model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0]   # (L, D)
            torch.testing.assert_close(out.hidden[i, :len(plain)], plain, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.pooled[i], plain[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_rows_are_never_fully_masked(tokenizer, layer, backbone, attn):
    """Under fp16 autocast the float32 minimum of the bias becomes -inf, and a row with nothing visible
    gives NaN, which 0 * NaN then spreads to every row. Padding sees itself, so even -inf stays finite."""
    backbone.model.set_attn_implementation(attn)
    batch = collate_trees([layer("the dog", []), layer(TEXT, MENTIONS)])
    bias = torch.where(batch["visible"], 0.0, float("-inf"))[:, None]  # (B, 1, L, L)
    with torch.no_grad():
        out = backbone.model(batch["input_ids"], attention_mask=bias,
                             position_ids=batch["position_ids"]).last_hidden_state
    assert torch.isfinite(out).all()


# --- pretraining ------------------------------------------------------------------------------------

def test_mlm_masks_trunk_tokens_only_at_15_percent(tokenizer, layer, backbone):
    model = KBert(backbone, KBertConfig(max_length=64))
    batch = collate_trees([layer(TEXT, MENTIONS), layer("the dog", [])] * 200)
    ids, labels = model.mlm_inputs(batch, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    maskable = batch["trunk"] & ~batch["special"] & batch["attention_mask"].bool()
    assert not chosen[~maskable].any()                                  # never a branch, [CLS]/[SEP], pad
    assert torch.equal(ids[~maskable], batch["input_ids"][~maskable])   # knowledge reaches the model intact
    n = int(maskable.sum())                                             # 200 * (6 + 2) = 1600
    rate = float(chosen.sum()) / n
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5              # within 4 standard deviations
    assert torch.equal(labels[chosen], batch["input_ids"][chosen])


def test_a_few_steps_reduce_the_mlm_loss(tokenizer, layer, backbone):
    torch.manual_seed(0)
    model = KBert(backbone, KBertConfig(max_length=64, mlm_prob=0.3))
    texts = [(TEXT, MENTIONS), ("steve jobs founded apple", []), ("paris is the capital of france", []),
             ("the dog was red", [])]
    batch = collate_trees([layer(t, m) for t, m in texts], pad_token_id=tokenizer.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        out = model.loss(batch, torch.Generator().manual_seed(1))       # the same masks every step
        assert set(out) == {"mlm", "total"}
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        losses.append(out["total"].item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_mlm_head_is_tied_to_word_embeddings(backbone):
    model = KBert(backbone, KBertConfig(max_length=64))
    emb = backbone.model.embeddings.word_embeddings.weight
    grad = torch.autograd.grad(model.mlm_logits(torch.randn(3, 32)).sum(), emb)[0]
    assert grad.abs().sum() > 0
    assert sum(p is emb for p in model.parameters()) == 1               # one table, not a copy


# --- construction and variants ----------------------------------------------------------------------

def test_config_checks(tokenizer, backbone):
    with pytest.raises(ValueError, match="position embeddings"):
        KBert(backbone, KBertConfig(max_length=65))
    with pytest.raises(ValueError, match="k >= 0"):
        KnowledgeLayer(tokenizer, TripleLookup([]), k=-1)


def test_tiny_variant(tokenizer):
    model = kbert_tiny(tokenizer, k=1)
    assert "hidden_size=32" in repr(model) and "k=1" in repr(model)
    tree = model.knowledge_layer(TripleLookup(TRIPLES))(TEXT, MENTIONS)
    assert tree.injected == 2
    out = model.encode(collate_trees([tree]))
    assert out.hidden.shape == (1, len(tree), 32) and out.pooled.shape == (1, 32)


def test_minilm_variant(minilm_path):
    model = KBert(load_backbone(str(minilm_path))).eval()   # the MLM head is new: MiniLM ships none
    layer = model.knowledge_layer(TripleLookup(TRIPLES))
    tree = layer(TEXT, MENTIONS)
    assert model.tokenizer.convert_ids_to_tokens(tree.input_ids.tolist())[:5] == [
        "[CLS]", "tim", "cook", "ceo", "apple"]
    batch = collate_trees([tree, layer("the dog", [])], pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.encode(batch)
        loss = model.loss(batch, torch.Generator().manual_seed(0))["total"]
    assert out.hidden.shape == (2, len(tree), 384)
    assert torch.isfinite(out.hidden).all() and torch.isfinite(loss)
