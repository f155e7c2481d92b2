"""Tests for clip.py: the CLIP encoders run in three stages, the CRIS/ETRIS modifications, OpenAI's shapes and names,
numerics against torch's own attention, and building from state dicts."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip as C
from clip_loader import ARCHITECTURES, random_clip_state_dict

EOT = 49407


@pytest.fixture(scope="module")
def vit_sd():
    return random_clip_state_dict("tiny-ViT")


@pytest.fixture(scope="module")
def rn_sd():
    return random_clip_state_dict("tiny-RN")


def _tokens(lengths, word_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), word_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = 49406
        tokens[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tokens[i, n - 1] = EOT
    return tokens


def encode_text(m, tokens):
    x = m.embed_text(tokens)
    for i in range(3):
        x = m.text_stage(i, x)
    return m.text_output(x, tokens)


# ---------------------------------------------------------------- stages and shapes

def test_vit_stages_and_maps(vit_sd):
    torch.manual_seed(0)
    m = C.build_clip(vit_sd, input_size=128).eval()
    v = m.visual
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        x = v.embed(images)
        assert x.shape == (2, 1 + 64, 64)
        by_block = x
        for block in v.transformer.resblocks:  # 6 blocks: stages of 2
            by_block = block(by_block)
        for i in range(3):
            x = v.stage(i, x)
        assert torch.equal(x, by_block)
        fmap = v.feature_map(x)
        assert fmap.shape == (2, 64, 8, 8) and fmap.is_contiguous()
        assert torch.equal(fmap[1, :, 2, 5], x[1, 1 + 2 * 8 + 5])  # row-major patches after the class token
        out = v.output_map(x)
        assert out.shape == (2, 64, 8, 8)
        torch.testing.assert_close(out[0, :, 7, 0], v.ln_post(x[0, 1 + 7 * 8]) @ v.proj)
        res = torch.randn(2, 64, 8, 8)
        y, ymap = v.add_residual(x, fmap, res)
        assert torch.equal(y[:, 0], x[:, 0])  # the class token is left as it is
        assert torch.equal(v.feature_map(y), ymap) and torch.equal(ymap, fmap + res)
    with pytest.raises(ValueError, match="128x128"):
        v.embed(torch.randn(1, 3, 224, 224))


def test_text_is_causal_and_reads_the_end_token(vit_sd):
    m = C.build_clip(vit_sd, input_size=224).eval()
    tokens = _tokens([6]).repeat(2, 1)
    tokens[1, 6:] = torch.arange(100, 111)  # differs only after the end token
    with torch.no_grad():
        words, sentence = encode_text(m, tokens)
        short_words, short = encode_text(m, tokens[:, :8])  # fewer positions: the mask is cut, same result
    assert words.shape == (2, 17, 64) and sentence.shape == (2, 64)
    torch.testing.assert_close(sentence[0], sentence[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(words[0, :6], words[1, :6], rtol=0, atol=1e-6)
    torch.testing.assert_close(short, sentence, rtol=0, atol=1e-5)
    torch.testing.assert_close(sentence[0], words[0, 5] @ m.text_projection)  # the end token, projected
    t = m.embed_text(tokens)
    torch.testing.assert_close(t[1, 3], m.token_embedding.weight[tokens[1, 3]] + m.positional_embedding[3])
    assert "attn_mask" not in m.state_dict() and m.attn_mask.shape == (77, 77)


def test_resnet_stages(rn_sd):
    torch.manual_seed(0)
    m = C.build_clip(rn_sd, input_size=128).eval()
    v = m.visual
    assert v.attnpool.positional_embedding.shape == (50, 512)  # kept at 7x7, resized per forward
    assert torch.equal(v.attnpool.connect[1].weight, torch.ones(128))  # default BN init
    with torch.no_grad():
        x = v.embed(torch.randn(2, 3, 128, 128))
        assert x.shape == (2, 64, 32, 32)  # stem + layer1
        shapes = []
        for i in range(3):
            x = v.stage(i, x)
            shapes.append(tuple(x.shape))
        assert shapes == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
        fmap = v.output_map(x)
    assert fmap.shape == (2, 128, 4, 4) and float(fmap.min()) >= 0 and float(fmap.max()) > 0
    assert v.feature_map(x) is x
    assert encode_text(m, _tokens([4, 9]))[1].shape == (2, 128)


# ---------------------------------------------------------------- full-size architecture inference

def _openai_like(**cfg):
    with torch.device("meta"):
        sd = C.CLIP(**cfg).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("visual.attnpool.connect.")}
    for key in ("input_resolution", "context_length", "vocab_size"):  # as in OpenAI's archives
        sd[key] = torch.empty((), dtype=torch.long, device="meta")
    return sd


@pytest.mark.parametrize("name, cfg, shapes", [
    ("ViT-B/16",
     dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, vision_grid=14),
     {"visual.proj": (768, 512), "visual.positional_embedding": (197, 768),
      "visual.conv1.weight": (768, 3, 16, 16), "text_projection": (512, 512)}),
    ("RN50",
     dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None, vision_grid=7),
     {"visual.attnpool.positional_embedding": (50, 2048), "visual.attnpool.c_proj.weight": (1024, 2048),
      "visual.layer4.2.bn3.weight": (2048,), "visual.layer2.0.downsample.0.weight": (512, 256, 1, 1),
      "text_projection": (512, 1024)}),
    ("RN101",
     dict(embed_dim=512, vision_layers=(3, 4, 23, 3), vision_width=64, vision_patch_size=None, vision_grid=7),
     {"visual.layer3.22.conv3.weight": (1024, 256, 1, 1), "visual.attnpool.c_proj.weight": (512, 2048),
      "text_projection": (512, 512)}),
])
def test_full_size_inference(name, cfg, shapes):
    text = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
    sd = _openai_like(**cfg, **text)
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert C.clip_config(sd) == {**cfg, **text}
    with torch.device("meta"):  # heads follow OpenAI's rule (head width 64)
        m = C.CLIP(**C.clip_config(sd))
    if name == "ViT-B/16":
        assert m.visual.transformer.resblocks[0].attn.heads == 12
    else:
        assert m.visual.attnpool.num_heads == 32
    assert m.transformer.resblocks[0].attn.heads == 8


def test_architecture_table_matches_openai_shapes():
    for name in ("ViT-B/16", "RN50", "RN101"):
        with torch.device("meta"):
            sd = C.CLIP(**{**dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                                  transformer_layers=12), **ARCHITECTURES[name]}).state_dict()
        assert C.clip_config(sd)["embed_dim"] == ARCHITECTURES[name]["embed_dim"]


# ---------------------------------------------------------------- numerics against independent code

def test_pos_embed_resize(vit_sd):
    pos = vit_sd["visual.positional_embedding"]
    m = C.build_clip(vit_sd, input_size=160)
    grid = pos[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:1], grid.flatten(2)[0].t()])
    assert m.visual.positional_embedding.shape == (101, 64)
    torch.testing.assert_close(m.visual.positional_embedding.data, expected, rtol=0, atol=0)
    same = C.build_clip(vit_sd, input_size=224)
    assert torch.equal(same.visual.positional_embedding.data, pos)
    assert torch.equal(vit_sd["visual.positional_embedding"], pos)  # the input dict is untouched
    with pytest.raises(ValueError, match="multiple of the ViT patch size 16"):
        C.build_clip(vit_sd, input_size=100)


def test_attnpool_matches_multi_head_attention_forward(rn_sd):
    torch.manual_seed(0)
    pool = C.build_clip(rn_sd, input_size=224).visual.attnpool.eval()
    nn.init.normal_(pool.connect[1].weight)  # make the residual branch non-trivial
    x = torch.randn(2, 512, 5, 6)  # non-square map
    B, Cin, H, W = x.shape
    pos = pool.positional_embedding[1:].reshape(1, 7, 7, Cin).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).flatten(2)
    seq = (x.flatten(2) + pos).permute(2, 0, 1)  # [HW, B, C]
    out, _ = F.multi_head_attention_forward(
        seq, seq, seq, Cin, 8, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias, training=False,
        need_weights=False, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight)
    expected = F.relu(out.permute(1, 2, 0).reshape(B, -1, H, W) + pool.connect(x))
    with torch.no_grad():
        got = pool(x)
    assert got.shape == (2, 128, 5, 6)
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_block_matches_nn_multihead_attention(causal):
    torch.manual_seed(0)
    block = C.ResidualAttentionBlock(64, 4)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    mha = nn.MultiheadAttention(64, 4)  # sequence-first, as OpenAI uses it
    mha.load_state_dict(block.attn.state_dict())
    x = torch.randn(3, 11, 64)
    mask = torch.full((11, 11), float("-inf")).triu(1) if causal else None
    h = block.ln_1(x).transpose(0, 1)
    y = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
    c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
    z = c_fc(block.ln_2(y))
    expected = y + c_proj(z * torch.sigmoid(1.702 * z))
    with torch.no_grad():
        torch.testing.assert_close(block(x, mask), expected.detach(), rtol=0, atol=1e-5)
    assert set(block.state_dict()) >= {"attn.in_proj_weight", "attn.in_proj_bias",
                                       "attn.out_proj.weight", "attn.out_proj.bias",
                                       "ln_1.weight", "mlp.c_fc.weight", "mlp.c_proj.bias", "ln_2.bias"}


# ---------------------------------------------------------------- build_clip validation

def test_build_clip_rejects_bad_dicts(vit_sd, rn_sd):
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        C.build_clip({"weight": torch.ones(3)}, 224)
    broken = dict(vit_sd)
    del broken["visual.ln_post.weight"]
    with pytest.raises(ValueError, match="visual.ln_post.weight"):
        C.build_clip(broken, 224)
    extra = dict(rn_sd, **{"visual.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="visual.extra.weight"):
        C.build_clip(extra, 224)
    wrong_shape = dict(vit_sd, **{"ln_final.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="ln_final.bias"):
        C.build_clip(wrong_shape, 224)
    with pytest.raises(ValueError, match="multiple of 32"):
        C.build_clip(rn_sd, 200)


def test_build_clip_loads_everything_but_connect(rn_sd):
    m = C.build_clip({k: v.half() for k, v in rn_sd.items()}, 224)  # fp16 in -> fp32 model
    got = m.state_dict()
    assert {k for k in got if k not in rn_sd} == {k for k in got if k.startswith("visual.attnpool.connect.")}
    for k, v in rn_sd.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v.half().to(v.dtype), rtol=0, atol=0)
