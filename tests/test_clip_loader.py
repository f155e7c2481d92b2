"""Tests for clip_loader.py: architecture, CRIS/ETRIS modifications, loading and caching."""
import io
import hashlib
import os
import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_loader as C  # noqa: E402

EOT = 49407


@pytest.fixture(scope="module")
def vit_sd():
    return C.tiny_clip_state_dict("ViT")


@pytest.fixture(scope="module")
def rn_sd():
    return C.tiny_clip_state_dict("RN")


def _tokens(lengths, word_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), word_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = 49406
        tokens[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tokens[i, n - 1] = EOT
    return tokens


# ---------------------------------------------------------------- tiny state dicts and shapes

def test_tiny_state_dicts(vit_sd, rn_sd):
    assert all(v.dtype == torch.float32 for v in vit_sd.values() if v.is_floating_point())
    assert not any(k.startswith("visual.attnpool.connect") for k in rn_sd)
    assert vit_sd["visual.positional_embedding"].shape == (14 * 14 + 1, 64)
    assert vit_sd["visual.conv1.weight"].shape == (64, 3, 16, 16)
    assert rn_sd["visual.attnpool.positional_embedding"].shape == (50, 512)
    assert rn_sd["text_projection"].shape == (64, 128)
    for sd in (vit_sd, rn_sd):
        cfg = C.clip_config(sd)
        assert cfg["transformer_layers"] % 3 == 0 and cfg["context_length"] == 77
        assert cfg["vocab_size"] == 49408 and cfg["transformer_width"] == 64
    assert C.clip_config(vit_sd)["vision_layers"] == 6
    assert C.clip_config(rn_sd)["vision_layers"] == (1, 1, 1, 1)
    again = C.tiny_clip_state_dict("ViT", seed=0)
    other = C.tiny_clip_state_dict("ViT", seed=1)
    assert all(torch.equal(vit_sd[k], again[k]) for k in vit_sd)
    assert not torch.equal(vit_sd["visual.proj"], other["visual.proj"])
    with pytest.raises(ValueError, match="'ViT' or 'RN'"):
        C.tiny_clip_state_dict("vit")


def test_vit_shapes_and_pooling(vit_sd):
    torch.manual_seed(0)
    m = C.build_clip(vit_sd, word_len=17, input_size=128).eval()
    assert m.training is False and m.word_len == 17
    images = torch.randn(2, 3, 128, 128)
    tokens = _tokens([5, 17])
    x = m.visual.embed(images)
    assert x.shape == (2, 1 + 64, 64)
    for block in m.visual.transformer.resblocks:
        x = block(x)
    assert x.shape == (2, 65, 64)
    pooled = m.visual.ln_post(x[:, 0]) @ m.visual.proj
    torch.testing.assert_close(m.encode_image(images), pooled, rtol=0, atol=0)
    t = m.embed_text(tokens)
    assert t.shape == (2, 17, 64) and m.positional_embedding.shape == (77, 64)
    torch.testing.assert_close(t[1, 3], m.token_embedding.weight[tokens[1, 3]] + m.positional_embedding[3])
    assert m.encode_text(tokens).shape == (2, 64)
    with torch.no_grad():
        logits_img, logits_txt = m(images, tokens)
    assert logits_img.shape == (2, 2) and torch.equal(logits_txt, logits_img.t())
    assert float(logits_img.abs().max()) <= m.logit_scale.exp().item() + 1e-4  # cosine * scale
    with pytest.raises(ValueError, match="128x128"):
        m.visual.embed(torch.randn(1, 3, 224, 224))


def test_text_is_causal_and_mask_cut(vit_sd):
    m = C.build_clip(vit_sd, word_len=17, input_size=224).eval()
    tokens = _tokens([6]).repeat(2, 1)
    tokens[1, 6:] = torch.arange(100, 111)  # differs only after the end token
    sentence = m.encode_text(tokens)
    torch.testing.assert_close(sentence[0], sentence[1], rtol=0, atol=1e-6)
    short = m.encode_text(tokens[:, :8])  # L=8 < word_len: the mask is cut, same result
    torch.testing.assert_close(short, sentence, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="word_len=17"):
        m.encode_text(torch.ones(1, 18, dtype=torch.long))


def test_resnet_shapes(rn_sd):
    torch.manual_seed(0)
    m = C.build_clip(rn_sd, word_len=17, input_size=128).eval()
    v = m.visual
    assert v.attnpool.positional_embedding.shape == (50, 512)  # kept at 7x7, resized per forward
    assert torch.equal(v.attnpool.connect[1].weight, torch.ones(128))  # default BN init
    images = torch.randn(2, 3, 128, 128)
    x = v.stem(images)
    assert x.shape == (2, 16, 32, 32)
    shapes = []
    for layer in (v.layer1, v.layer2, v.layer3, v.layer4):
        x = layer(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    with torch.no_grad():
        fmap = v.attnpool(x)
    assert fmap.shape == (2, 128, 4, 4) and float(fmap.min()) >= 0 and float(fmap.max()) > 0
    torch.testing.assert_close(m.encode_image(images), fmap.mean(dim=(2, 3)))
    assert m.encode_text(_tokens([4, 9])).shape == (2, 128)
    assert m(images, _tokens([4, 9]))[0].shape == (2, 2)


# ---------------------------------------------------------------- full-size architecture inference

def _openai_like(**cfg):
    with torch.device("meta"):
        sd = C.CLIP(**cfg, word_len=77).state_dict()
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
        m = C.CLIP(**C.clip_config(sd), word_len=17)
    if name == "ViT-B/16":
        assert m.visual.transformer.resblocks[0].attn.heads == 12
    else:
        assert m.visual.attnpool.num_heads == 32
    assert m.transformer.resblocks[0].attn.heads == 8


# ---------------------------------------------------------------- numerics against independent code

def test_pos_embed_resize(vit_sd):
    pos = vit_sd["visual.positional_embedding"]
    m = C.build_clip(vit_sd, word_len=17, input_size=160)
    grid = pos[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:1], grid.flatten(2)[0].t()])
    assert m.visual.positional_embedding.shape == (101, 64)
    torch.testing.assert_close(m.visual.positional_embedding.data, expected, rtol=0, atol=0)
    same = C.build_clip(vit_sd, word_len=17, input_size=224)
    assert torch.equal(same.visual.positional_embedding.data, pos)
    assert torch.equal(vit_sd["visual.positional_embedding"], pos)  # the input dict is untouched
    with pytest.raises(ValueError, match="multiple of the ViT patch size 16"):
        C.build_clip(vit_sd, word_len=17, input_size=100)


def test_attnpool_matches_multi_head_attention_forward(rn_sd):
    torch.manual_seed(0)
    pool = C.build_clip(rn_sd, word_len=17, input_size=224).visual.attnpool.eval()
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
    block = C.ResidualAttentionBlock(64, 4, C.causal_mask(17) if causal else None)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    mha = nn.MultiheadAttention(64, 4)  # sequence-first, as OpenAI uses it
    mha.load_state_dict(block.attn.state_dict())
    x = torch.randn(3, 11, 64)  # L=11 < word_len=17: mask cut to L
    mask = torch.full((17, 17), float("-inf")).triu(1)[:11, :11] if causal else None
    h = block.ln_1(x).transpose(0, 1)
    y = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
    c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
    z = c_fc(block.ln_2(y))
    expected = y + c_proj(z * torch.sigmoid(1.702 * z))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected.detach(), rtol=0, atol=1e-5)
    assert set(block.state_dict()) >= {"attn.in_proj_weight", "attn.in_proj_bias",
                                       "attn.out_proj.weight", "attn.out_proj.bias",
                                       "ln_1.weight", "mlp.c_fc.weight", "mlp.c_proj.bias", "ln_2.bias"}


# ---------------------------------------------------------------- build_clip validation

def test_build_clip_rejects_bad_dicts(vit_sd, rn_sd):
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        C.build_clip({"weight": torch.ones(3)}, 17, 224)
    broken = dict(vit_sd)
    del broken["visual.ln_post.weight"]
    with pytest.raises(ValueError, match="visual.ln_post.weight"):
        C.build_clip(broken, 17, 224)
    extra = dict(rn_sd, **{"visual.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="visual.extra.weight"):
        C.build_clip(extra, 17, 224)
    wrong_shape = dict(vit_sd, **{"ln_final.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="ln_final.bias"):
        C.build_clip(wrong_shape, 17, 224)
    with pytest.raises(ValueError, match="word_len"):
        C.build_clip(vit_sd, 78, 224)


def test_build_clip_loads_everything_but_connect(rn_sd):
    m = C.build_clip({k: v.half() for k, v in rn_sd.items()}, 17, 224)  # fp16 in -> fp32 model
    got = m.state_dict()
    assert {k for k in got if k not in rn_sd} == {k for k in got if k.startswith("visual.attnpool.connect.")}
    for k, v in rn_sd.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v.half().to(v.dtype), rtol=0, atol=0)


# ---------------------------------------------------------------- files

def test_torchscript_fp16_archive(vit_sd, tmp_path):
    model = C.build_clip(vit_sd, word_len=77, input_size=224).half()

    class Archive(nn.Module):  # the same module tree as OpenAI's scripted CLIP
        def __init__(self):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, p)
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x):
            return x * self.logit_scale

    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(Archive(), torch.ones((), dtype=torch.half)).save(str(path))
    sd = C.load_clip_state_dict(str(path))
    assert set(sd) == set(vit_sd) | {"input_resolution"}
    for k, v in vit_sd.items():
        assert sd[k].dtype == torch.float32
        torch.testing.assert_close(sd[k], v.half().float(), rtol=0, atol=0)
    m = C.build_clip(sd, word_len=17, input_size=224)
    assert torch.equal(m.text_projection.data, vit_sd["text_projection"].half().float())


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_state_dict_files(rn_sd, tmp_path, wrap):
    half = {k: v.half() if v.is_floating_point() else v for k, v in rn_sd.items()}
    obj = half if wrap is None else {wrap: half, "epoch": 3}
    path = tmp_path / "clip.pth"
    torch.save(obj, path)
    sd = C.load_clip_state_dict(str(path))
    assert set(sd) == set(rn_sd)
    for k, v in rn_sd.items():
        assert sd[k].dtype == v.dtype
        torch.testing.assert_close(sd[k], half[k].to(v.dtype), rtol=0, atol=0)


def test_file_errors(tmp_path):
    not_clip = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.weight": torch.ones(2)}}, not_clip)
    with pytest.raises(ValueError, match=f"{not_clip} does not hold CLIP weights"):
        C.load_clip_state_dict(str(not_clip))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=f"{junk} is neither a TorchScript archive"):
        C.load_clip_state_dict(str(junk))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        C.load_clip_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="valid names are RN50, RN101, ViT-B/16"):
        C.load_clip_state_dict("ViT-H")


# ---------------------------------------------------------------- names, cache, download

@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(C.urllib.request, "urlopen", urlopen)
    return calls


@pytest.mark.parametrize("name", ["ViT-B/16", "ViT-B-16"])
def test_offline_name_lookup_message(tmp_path, no_network, name):
    url = C._MODELS["ViT-B/16"]
    with pytest.raises(RuntimeError) as err:
        C.load_clip_state_dict(name, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert url in msg and str(tmp_path / "ViT-B-16.pt") in msg and "--clip-weights PATH" in msg
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in msg
    assert no_network == [url]  # the patched urlopen was the only network access
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_default_cache_dir_from_env(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("ETRIS_CLIP_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=str(tmp_path / "RN101.pt")):
        C.load_clip_state_dict("RN101")


def test_cached_file_with_wrong_sha_is_rejected(tmp_path, no_network):
    (tmp_path / "RN50.pt").write_bytes(b"partial download")
    with pytest.raises(RuntimeError, match="SHA-256"):
        C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))
    assert no_network == []


def test_download_checks_sha_and_caches(rn_sd, tmp_path, monkeypatch):
    buf = io.BytesIO()
    torch.save(rn_sd, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    url = f"https://example.invalid/clip/{sha}/RN50.pt"
    monkeypatch.setitem(C._MODELS, "RN50", url)
    served = []

    def urlopen(u, *args, **kwargs):
        served.append(u)
        return io.BytesIO(payload)

    monkeypatch.setattr(C.urllib.request, "urlopen", urlopen)
    payload = data[:-10] + b"corrupted!"  # wrong bytes: rejected, nothing cached
    with pytest.raises(RuntimeError, match=f"expected {sha}"):
        C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    payload = data
    sd = C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["RN50.pt"] and served == [url, url]
    assert all(torch.equal(sd[k], v) for k, v in rn_sd.items())
    C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))  # from the cache this time
    assert served == [url, url]
