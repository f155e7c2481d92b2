"""Tests for clip_loader.py: OpenAI's archives and state-dict files, the cache, the download and its checks, and
the random CLIPs of the real architectures."""
import hashlib
import io
import os
import urllib.error
import warnings

import pytest
import torch
import torch.nn as nn

import clip_loader as C
from clip import build_clip, clip_config
from errors import UserError


@pytest.fixture(scope="module")
def vit_sd():
    return C.random_clip_state_dict("tiny-ViT")


@pytest.fixture(scope="module")
def rn_sd():
    return C.random_clip_state_dict("tiny-RN")


def test_random_state_dicts(vit_sd, rn_sd):
    assert all(v.dtype == torch.float32 for v in vit_sd.values() if v.is_floating_point())
    assert not any(k.startswith("visual.attnpool.connect") for k in rn_sd)
    assert vit_sd["visual.positional_embedding"].shape == (14 * 14 + 1, 64)
    assert vit_sd["visual.conv1.weight"].shape == (64, 3, 16, 16)
    assert rn_sd["visual.attnpool.positional_embedding"].shape == (50, 512)
    assert rn_sd["visual.layer1.0.conv1.weight"].shape == (16, 16, 1, 1)
    assert rn_sd["text_projection"].shape == (64, 128)
    for sd in (vit_sd, rn_sd):
        cfg = clip_config(sd)
        assert cfg["transformer_layers"] % 3 == 0 and cfg["context_length"] == 77
        assert cfg["vocab_size"] == 49408 and cfg["transformer_width"] == 64
    assert clip_config(vit_sd)["vision_layers"] == 6
    assert clip_config(rn_sd)["vision_layers"] == (1, 1, 1, 1)
    again = C.random_clip_state_dict("tiny-ViT", seed=0)
    other = C.random_clip_state_dict("tiny-ViT", seed=1)
    assert all(torch.equal(vit_sd[k], again[k]) for k in vit_sd)
    assert not torch.equal(vit_sd["visual.proj"], other["visual.proj"])
    changed = C.random_clip_state_dict("tiny-ViT", vision_layers=3, vision_patch_size=8, vision_grid=8)
    assert clip_config(changed)["vision_layers"] == 3 and changed["visual.conv1.weight"].shape == (64, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-L/14'"):
        C.random_clip_state_dict("ViT-L/14")


# ---------------------------------------------------------------- files

def test_torchscript_fp16_archive(vit_sd, tmp_path):
    model = build_clip(vit_sd, input_size=224).half()

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = C.load_clip_state_dict(str(path))
    assert [str(w.message) for w in caught] == []  # torch 2.14 deprecates torch.jit.load, with a FutureWarning
    assert set(sd) == set(vit_sd) | {"input_resolution"}
    for k, v in vit_sd.items():
        assert sd[k].dtype == torch.float32
        torch.testing.assert_close(sd[k], v.half().float(), rtol=0, atol=0)
    m = build_clip(sd, input_size=224)
    assert torch.equal(m.text_projection.data, vit_sd["text_projection"].half().float())


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_state_dict_files(rn_sd, tmp_path, wrap):
    half = {k: v.half() if v.is_floating_point() else v for k, v in rn_sd.items()}
    obj = half if wrap is None else {wrap: half, "epoch": 3}
    path = tmp_path / "clip.pth"
    torch.save(obj, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = C.load_clip_state_dict(str(path))
    assert [str(w.message) for w in caught] == []  # no torch.jit.load tried first: it warns from torch 2.14 on
    assert set(sd) == set(rn_sd)
    for k, v in rn_sd.items():
        assert sd[k].dtype == v.dtype
        torch.testing.assert_close(sd[k], half[k].to(v.dtype), rtol=0, atol=0)


def test_file_errors(tmp_path):
    not_clip = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.weight": torch.ones(2)}}, not_clip)
    with pytest.raises(UserError, match=f"{not_clip} does not hold CLIP weights"):
        C.load_clip_state_dict(str(not_clip))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match=f"{junk} is neither a TorchScript archive"):
        C.load_clip_state_dict(str(junk))
    with pytest.raises(UserError, match="missing.pt"):
        C.load_clip_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="valid names are RN50, RN101, ViT-B/16"):
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
    with pytest.raises(UserError) as err:
        C.load_clip_state_dict(name, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert url in msg and str(tmp_path / "ViT-B-16.pt") in msg and "--clip-weights PATH" in msg
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in msg
    assert no_network == [url]  # the patched urlopen was the only network access
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_default_cache_dir_from_env(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("ETRIS_CLIP_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "RN101.pt")):
        C.load_clip_state_dict("RN101")


def test_cached_file_with_wrong_sha_is_rejected(tmp_path, no_network):
    (tmp_path / "RN50.pt").write_bytes(b"partial download")
    with pytest.raises(UserError, match="SHA-256"):
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
    with pytest.raises(UserError, match=f"expected {sha}"):
        C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    payload = data
    sd = C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["RN50.pt"] and served == [url, url]
    assert all(torch.equal(sd[k], v) for k, v in rn_sd.items())
    C.load_clip_state_dict("RN50", cache_dir=str(tmp_path))  # from the cache this time
    assert served == [url, url]
