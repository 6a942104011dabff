"""Tests of egma_fast.models: tower shapes and norms, padding invariance, configs, backends, FSDP2."""
from __future__ import annotations

import os
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from egma_fast.models import (
    BackendUnavailableError,
    EGMAModel,
    EGMAOutput,
    ModelConfig,
    build_tokenizer,
    register_fsdp_forward_methods,
    tokenize_reports,
    tokenize_texts,
)

REPORTS = [
    ["the heart is enlarged.", "there is a small left pleural effusion."],
    ["lungs are clear."],
    ["small right apical pneumothorax.", "no focal consolidation.", "normal heart size."],
    ["mild bibasilar opacity."],
]


def _build(config: ModelConfig, seed: int = 0) -> EGMAModel:
    torch.manual_seed(seed)
    return EGMAModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny-bert")


@pytest.fixture(scope="module")
def swin():
    return _build(ModelConfig.tiny(image_size=64, embed_dim=32))


@pytest.fixture(scope="module")
def vit():
    return _build(ModelConfig.tiny(image_size=64, embed_dim=32, image_model="tiny-vit"))


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenize_reports(tokenizer, REPORTS)


# --- shapes and norms ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["swin", "vit"])
def test_forward_shapes_and_l2_norms(which, request, batch):
    model: EGMAModel = request.getfixturevalue(which)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        out = model(images, **batch)
    assert isinstance(out, EGMAOutput)
    assert model.num_patches == 16
    assert out.patch_features.shape == (4, 16, 32)
    assert out.sentence_features.shape == (4, 3, 32)
    assert out.image_embeddings.shape == (4, 32)
    assert out.text_embeddings.shape == (4, 32)
    assert out.sentence_mask.dtype == torch.bool
    assert torch.equal(out.sentence_mask, batch["sentence_mask"])
    torch.testing.assert_close(out.patch_features.norm(dim=-1), torch.ones(4, 16))
    torch.testing.assert_close(out.image_embeddings.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeddings.norm(dim=-1), torch.ones(4))
    norms = out.sentence_features.norm(dim=-1)
    torch.testing.assert_close(norms[batch["sentence_mask"]], torch.ones(int(batch["sentence_mask"].sum())))
    assert torch.all(norms[~batch["sentence_mask"]] == 0)
    assert torch.all(out.sentence_features[~batch["sentence_mask"]] == 0)


def test_tiny_swin_224_gives_7x7_grid():
    model = _build(ModelConfig.tiny(image_size=224, embed_dim=16))
    assert model.num_patches == 49
    with torch.no_grad():
        p = model.encode_patches(torch.randn(1, 3, 224, 224))
    assert p.shape == (1, 49, 16)


def test_patch_tokens_are_row_major_grid(swin):
    """Token i of the last stage comes from grid cell (i // g, i % g): perturbing one image
    quadrant changes the patches of that quadrant most."""
    torch.manual_seed(1)
    base = torch.randn(1, 3, 64, 64)
    bumped = base.clone()
    bumped[..., 48:, 48:] += 3.0  # bottom-right 16 x 16 px = grid cell (3, 3) of a 4 x 4 grid
    with torch.no_grad():
        change = (swin.encode_patches(bumped) - swin.encode_patches(base)).norm(dim=-1)[0]
    assert int(change.argmax()) == 15


def test_grayscale_images_equal_repeated_rgb(swin):
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a = swin.encode_image(gray)
        b = swin.encode_image(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b)


def test_vit_cls_is_global_not_a_patch(vit):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = vit.image_tower.encoder(pixel_values=images).last_hidden_state
        out = vit.image_tower(images)
    assert hidden.shape[1] == 17  # CLS + 16 patches
    torch.testing.assert_close(out.patches, F.normalize(vit.image_tower.patch_proj(hidden[:, 1:]), dim=-1))
    torch.testing.assert_close(out.embedding, F.normalize(vit.image_tower.global_proj(hidden[:, 0]), dim=-1))


# --- padding: zero features, no influence on real sentences --------------------------------


def test_padding_content_does_not_change_outputs(swin, batch):
    images = torch.randn(4, 3, 64, 64)
    garbage = {k: v.clone() for k, v in batch.items()}
    pad_slot = ~batch["sentence_mask"]
    g = torch.Generator().manual_seed(0)
    # Random ids and a full attention mask in every padded sentence slot.
    garbage["sentence_input_ids"][pad_slot] = torch.randint(1000, 30000, garbage["sentence_input_ids"][pad_slot].shape, generator=g)
    garbage["sentence_attention_mask"][pad_slot] = 1
    with torch.no_grad():
        a = swin(images, **batch)
        b = swin(images, **garbage)
    for name in ("patch_features", "sentence_features", "image_embeddings", "text_embeddings"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.all(b.sentence_features[pad_slot] == 0)


def test_padding_tokens_inside_real_sentences_do_not_matter(swin, batch):
    images = torch.randn(4, 3, 64, 64)
    garbage = {k: v.clone() for k, v in batch.items()}
    pad_tok = (batch["sentence_attention_mask"] == 0) & batch["sentence_mask"][..., None]
    assert pad_tok.any()
    garbage["sentence_input_ids"][pad_tok] = 4242
    with torch.no_grad():
        a = swin(images, **batch)
        b = swin(images, **garbage)
    torch.testing.assert_close(a.sentence_features, b.sentence_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.text_embeddings, b.text_embeddings, atol=1e-6, rtol=0)


def test_extra_padding_slots_and_tokens_leave_real_features_unchanged(swin, batch):
    b, m, length = batch["sentence_input_ids"].shape
    wide = {
        "sentence_input_ids": torch.zeros(b, m + 2, length + 5, dtype=torch.long),
        "sentence_attention_mask": torch.zeros(b, m + 2, length + 5, dtype=torch.long),
        "sentence_mask": torch.zeros(b, m + 2, dtype=torch.bool),
    }
    wide["sentence_input_ids"][:, :m, :length] = batch["sentence_input_ids"]
    wide["sentence_attention_mask"][:, :m, :length] = batch["sentence_attention_mask"]
    wide["sentence_mask"][:, :m] = batch["sentence_mask"]
    with torch.no_grad():
        a = swin.text_tower(**batch)
        c = swin.text_tower(**wide)
    assert torch.equal(c.sentence_features[:, :m], a.sentence_features)
    assert torch.all(c.sentence_features[:, m:] == 0)
    assert torch.equal(c.embedding, a.embedding)


def test_sentence_and_report_features_match_their_definitions(swin, tokenizer, batch):
    tower = swin.text_tower
    with torch.no_grad():
        out = tower(**batch)
        for i, report in enumerate(REPORTS):
            ids, mask = tokenize_texts(tokenizer, report)
            pooled = tower.pool_tokens(ids, mask)
            # Each sentence is encoded on its own: same as encode_sentences of that sentence.
            torch.testing.assert_close(out.sentence_features[i, : len(report)], tower.encode_sentences(ids, mask), atol=1e-5, rtol=1e-5)
            expected = F.normalize(tower.report_proj(pooled.mean(0)), dim=-1)
            torch.testing.assert_close(out.embedding[i], expected, atol=1e-5, rtol=1e-5)
        # A one-sentence report's embedding is encode_text of that sentence.
        ids, mask = tokenize_texts(tokenizer, REPORTS[1])
        torch.testing.assert_close(out.embedding[1:2], swin.encode_text(ids, mask), atol=1e-5, rtol=1e-5)


def test_mask_aware_mean_pooling_matches_manual(swin, tokenizer):
    ids, mask = tokenize_texts(tokenizer, ["a short one.", "a considerably longer sentence about the lungs."])
    enc = swin.text_tower.encoder
    with torch.no_grad():
        hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        manual = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(2)])
        torch.testing.assert_close(swin.text_tower.pool_tokens(ids, mask), manual, atol=1e-5, rtol=1e-5)


def test_report_without_sentences_and_batch_without_any(swin, batch):
    b = {k: v.clone() for k, v in batch.items()}
    b["sentence_mask"][1] = False
    out = swin.text_tower(**b)
    assert torch.all(out.embedding[1] == 0) and torch.all(out.sentence_features[1] == 0)
    torch.testing.assert_close(out.embedding[[0, 2, 3]].norm(dim=-1), torch.ones(3))
    # No real sentence at all: zeros, and backward still reaches the encoder (FSDP ranks stay in step).
    empty = {k: v.clone() for k, v in batch.items()}
    empty["sentence_mask"][:] = False
    swin.zero_grad()
    out = swin.text_tower(**empty)
    assert torch.all(out.sentence_features == 0) and torch.all(out.embedding == 0)
    (out.sentence_features.sum() + out.embedding.sum()).backward()
    grads = [p.grad for p in swin.text_tower.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[-4:])
    swin.zero_grad(set_to_none=True)


# --- training friendliness ------------------------------------------------------------------


def test_every_parameter_gets_a_gradient_and_step_is_fast(batch):
    model = _build(ModelConfig.tiny(image_size=64, embed_dim=32)).train()
    images = torch.randn(4, 3, 64, 64)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(images, **batch)
        loss = sum(t.float().pow(2).sum() for t in (out.patch_features @ torch.ones(32), out.sentence_features, out.image_embeddings.cumsum(-1), out.text_embeddings.cumsum(-1)))
        loss.backward()

    step()  # warm-up
    times = []
    for _ in range(3):
        # CPU time of this process (all its threads): robust to other jobs sharing the machine.
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert min(times) < 1.0, times


def test_gradient_checkpointing_gives_same_outputs_and_grads(batch):
    cfg = ModelConfig.tiny(image_size=64, embed_dim=16)
    a = _build(cfg).train()
    b = _build(cfg.replace(gradient_checkpointing=True)).train()
    b.load_state_dict(a.state_dict())
    images = torch.randn(4, 3, 64, 64)
    oa, ob = a(images, **batch), b(images, **batch)
    torch.testing.assert_close(ob.patch_features, oa.patch_features)
    (oa.patch_features.sum() + oa.text_embeddings[:, 0].sum()).backward()
    (ob.patch_features.sum() + ob.text_embeddings[:, 0].sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=n)


def test_bf16_model_takes_fp32_images(batch):
    model = _build(ModelConfig.tiny(image_size=64, embed_dim=16)).to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(4, 3, 64, 64), **batch)
    assert out.patch_features.dtype == torch.bfloat16 and out.text_embeddings.dtype == torch.bfloat16
    torch.testing.assert_close(out.image_embeddings.float().norm(dim=-1), torch.ones(4), atol=1e-2, rtol=0)
    torch.testing.assert_close(out.text_embeddings.float().norm(dim=-1), torch.ones(4), atol=1e-2, rtol=0)


def test_cpu_autocast_bf16_forward(swin, batch):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = swin(torch.randn(4, 3, 64, 64), **batch)
    assert out.patch_features.dtype == torch.bfloat16
    assert torch.all(out.sentence_features[~batch["sentence_mask"]] == 0)
    torch.testing.assert_close(out.image_embeddings.float().norm(dim=-1), torch.ones(4), atol=1e-2, rtol=0)


def test_transformer_blocks_cover_both_towers(swin, vit):
    names = [type(b).__name__ for b in swin.transformer_blocks()]
    assert names == ["SwinLayer", "SwinLayer", "BertLayer"]
    assert [type(b).__name__ for b in vit.transformer_blocks()] == ["ViTLayer", "BertLayer"]
    deep = _build(ModelConfig.tiny(image_size=64, embed_dim=16, tiny_layers=2))
    blocks = deep.transformer_blocks()
    assert len(blocks) == 2 * 2 + 2
    owned = {id(m) for m in deep.modules()}
    assert all(id(b) in owned for b in blocks)
    assert len({id(b) for b in blocks}) == len(blocks)


def test_fsdp2_single_rank_matches_unsharded(batch, tokenizer):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or dist.is_initialized():
        pytest.fail("this test needs torch.distributed and no process group already running")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = ModelConfig.tiny(image_size=64, embed_dim=16)
        ref = _build(cfg)
        model = _build(cfg, seed=1)
        model.load_state_dict(ref.state_dict())
        for block in model.transformer_blocks():
            fully_shard(block)
        fully_shard(model)
        register_fsdp_forward_methods(model)
        images = torch.randn(4, 3, 64, 64)
        ids, mask = tokenize_texts(tokenizer, ["cardiomegaly.", "no pneumothorax."])
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), ref.encode_image(images))
            torch.testing.assert_close(model.encode_patches(images), ref.encode_patches(images))
            torch.testing.assert_close(model.encode_text(ids, mask), ref.encode_text(ids, mask))
            torch.testing.assert_close(model.encode_sentences(ids, mask), ref.encode_sentences(ids, mask))
            torch.testing.assert_close(model.encode_reports(**batch), ref(images, **batch).text_embeddings)
            torch.testing.assert_close(model(images, **batch).text_embeddings, ref(images, **batch).text_embeddings)
    finally:
        dist.destroy_process_group()


# --- attention backends ---------------------------------------------------------------------


def test_eager_and_sdpa_agree(batch):
    cfg = ModelConfig.tiny(image_size=64, embed_dim=16)
    a = _build(cfg)
    b = _build(cfg.replace(attn_implementation="eager"))
    b.load_state_dict(a.state_dict())
    assert b.text_tower.encoder.config._attn_implementation == "eager"
    images = torch.randn(2, 3, 64, 64)
    sub = {k: v[:2] for k, v in batch.items()}
    with torch.no_grad():
        oa, ob = a(images, **sub), b(images, **sub)
    torch.testing.assert_close(oa.patch_features, ob.patch_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oa.sentence_features, ob.sentence_features, atol=1e-5, rtol=1e-5)


def test_xformers_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import of xformers now fails
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(BackendUnavailableError, match="xformers package"):
        EGMAModel(ModelConfig.tiny(attn_implementation="xformers"))
    with pytest.raises(ValueError, match="pip install"):
        EGMAModel(ModelConfig.tiny(attn_implementation="xformers"))


def test_xformers_backend_routes_through_memory_efficient_attention(monkeypatch, batch):
    """With a stand-in xformers (same contract: [B, L, H, D], additive attn_bias), outputs match sdpa."""
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.append(None if attn_bias is None else tuple(attn_bias.shape))
        assert q.dim() == 4 and p == 0.0
        if attn_bias is not None:
            assert attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    cfg = ModelConfig.tiny(image_size=64, embed_dim=16)
    a = _build(cfg)
    b = _build(cfg.replace(attn_implementation="xformers"))
    b.load_state_dict(a.state_dict())
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(images, **batch), b(images, **batch)
    assert calls, "xformers attention was never called"
    torch.testing.assert_close(ob.patch_features, oa.patch_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob.sentence_features, oa.sentence_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob.text_embeddings, oa.text_embeddings, atol=1e-5, rtol=1e-5)


# --- configuration and input validation ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"image_size": 100, "patch_grid": 4}, "image_size"),
        ({"image_model": "microsoft/swin-tiny-patch4-window7-224", "patch_grid": 7}, "patch_grid"),
        ({"tiny_width": 30, "tiny_heads": 4}, "tiny_width"),
        ({"image_size": 8}, "patch_grid"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("side", [40, 50, 54, 176])
def test_one_image_size_rule(side):
    from egma_fast.models import IMAGE_SIZE_RULE

    with pytest.raises(ValueError) as exc:
        ModelConfig.tiny(image_size=side)
    assert IMAGE_SIZE_RULE in str(exc.value)
    for ok in (16, 32, 48, 112, 128, 160, 224):
        assert ModelConfig.tiny(image_size=ok).grid in (ok // 16, ok // 32)


@pytest.mark.parametrize("field", ["image_model", "text_model"])
def test_unknown_hub_name_is_a_clear_local_only_error(field, tmp_path):
    from egma_fast.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="neither a local folder nor in the local Hugging Face cache") as exc:
        EGMAModel(ModelConfig.tiny().replace(**{field: "nobody/no-such-model"}))
    assert f"model.{field}='nobody/no-such-model'" in str(exc.value) and "nothing is downloaded" in str(exc.value)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        EGMAModel(ModelConfig.tiny().replace(**{field: str(tmp_path)}))


def test_model_config_grid_defaults():
    assert ModelConfig(image_size=224).grid == 7
    assert ModelConfig(image_size=128).grid == 4
    assert ModelConfig.tiny(image_size=64).grid == 4
    assert ModelConfig.tiny(image_size=96).grid == 6
    assert ModelConfig.tiny(image_size=128, patch_grid=8).grid == 8


@pytest.mark.parametrize("which", ["swin", "vit"])
def test_other_input_sizes_follow_grid_size(which, request):
    model: EGMAModel = request.getfixturevalue(which)
    side = model.image_tower.grid_size(96)
    assert side == 6
    with torch.no_grad():
        p = model.encode_patches(torch.randn(1, 3, 96, 96))
    assert p.shape == (1, side * side, 32)


def test_bad_inputs_raise_value_errors(swin, batch):
    images = torch.randn(4, 3, 64, 64)
    with pytest.raises(ValueError, match="images must be a tensor"):
        swin(images[0], **batch)
    with pytest.raises(ValueError, match="channels"):
        swin(torch.randn(4, 2, 64, 64), **batch)
    with pytest.raises(ValueError, match="floating-point"):
        swin.encode_image(torch.zeros(4, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same batch size"):
        swin(images[:3], **batch)
    with pytest.raises(ValueError, match="sentence_mask"):
        swin(images, batch["sentence_input_ids"], batch["sentence_attention_mask"], batch["sentence_mask"][:, :2])
    with pytest.raises(ValueError, match="sentence_attention_mask"):
        swin(images, batch["sentence_input_ids"], batch["sentence_attention_mask"][..., :-1], batch["sentence_mask"])
    with pytest.raises(ValueError, match="integer"):
        swin(images, batch["sentence_input_ids"].float(), batch["sentence_attention_mask"], batch["sentence_mask"])
    with pytest.raises(ValueError, match=r"input_ids must be a tensor \[N, L\]"):
        swin.encode_text(batch["sentence_input_ids"], batch["sentence_attention_mask"])


# --- tokenizer helpers ----------------------------------------------------------------------


def test_tokenize_reports_layout(tokenizer):
    out = tokenize_reports(tokenizer, REPORTS, max_length=16)
    ids, mask, smask = out["sentence_input_ids"], out["sentence_attention_mask"], out["sentence_mask"]
    assert ids.shape[:2] == (4, 3) and ids.shape == mask.shape and ids.shape[2] <= 16
    assert smask.tolist() == [[True, True, False], [True, False, False], [True, True, True], [True, False, False]]
    assert torch.all(ids[~smask] == 0) and torch.all(mask[~smask] == 0)
    assert torch.all(ids[smask][:, 0] == tokenizer.cls_token_id)
    single, single_mask = tokenize_texts(tokenizer, REPORTS[2])
    torch.testing.assert_close(ids[2, :, : single.shape[1]], single)
    cut = tokenize_reports(tokenizer, REPORTS, max_sentences=2)
    assert cut["sentence_mask"].shape == (4, 2)
    assert tokenizer.decode(ids[0, 0], skip_special_tokens=True) == "the heart is enlarged."


def test_tokenizer_helpers_reject_bad_input(tokenizer):
    with pytest.raises(ValueError, match="texts"):
        tokenize_texts(tokenizer, "not a list")
    with pytest.raises(ValueError, match=r"reports\[1\]"):
        tokenize_reports(tokenizer, [["ok."], "a string, not a list"])
    with pytest.raises(ValueError, match="model"):
        build_tokenizer("")
