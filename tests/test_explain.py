"""Tests of explain.py: the captured attention is the attention the model used (weights x values x output projection
give each module's own output in float64; rows sum to 1; GA's padded keys weigh zero, the Bridger's do not, as in
the authors' code), capture leaves the logits bit-identical, the figure's tiles and column labels follow the maps
and the words, and the command line reads our checkpoints and the authors' format, for both backbone families."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import explain
from checkpoint import save_checkpoint
from clip_loader import random_clip_state_dict
from errors import UserError
from model import build_model
from tokenizer import tokenize

BACKBONES = ["tiny-ViT", "tiny-RN"]
SENTENCES = ["the leftmost purplish skateboarder", "a red circle"]  # BPE pieces; two lengths, both padded


def tiny(backbone, input_size=64):
    torch.manual_seed(0)
    return build_model(backbone, input_size=input_size, word_len=17).eval()


def heads_apart(x, heads):  # [B, L, D] -> [B, h, L, D/h]
    B, L, D = x.shape
    return x.reshape(B, L, heads, D // heads).transpose(1, 2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_captured_weights_reproduce_each_attention_output(backbone):
    net = tiny(backbone).double()
    tokens = tokenize(SENTENCES, 17)
    padded = tokens == 0
    seen, handles = {}, []
    for name, module in explain.attention_sites(net).items():  # an independent record of each module's call
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[2], out)), with_kwargs=False))
    with torch.no_grad(), explain.capture_attention(net) as maps:
        net(torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), tokens)
    for h in handles:
        h.remove()
    assert set(maps) == set(seen) and len(maps) == 9  # 3 Bridger stages x 2 directions, 3 GA layers
    for name, w in maps.items():
        module, (value, out) = explain.attention_sites(net)[name], seen[name]
        assert w.dtype == torch.float64
        v = heads_apart(F.linear(value, module.in_proj_weight.chunk(3)[2], module.in_proj_bias.chunk(3)[2]),
                        module.heads)
        mixed = (w @ v).transpose(1, 2).reshape(out.shape)  # [B, Lq, D]
        assert torch.allclose(module.out_proj(mixed), out, rtol=0, atol=1e-12), name
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-12), name
        if name.endswith("reads_words"):  # the words are the keys
            on_padding = w.transpose(1, 3)[padded]  # [n padded keys, Lq, h]
            if name.startswith("ga_"):
                assert torch.all(on_padding == 0), name  # GA masks the padded words
            else:
                assert on_padding.sum(0).min() > 0, name  # the authors' Bridger has no padding mask


@pytest.mark.parametrize("backbone", BACKBONES)
def test_logits_are_bit_identical_with_and_without_capture(backbone):
    net = tiny(backbone)
    images, tokens = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), tokenize(SENTENCES, 17)
    with torch.no_grad():
        plain = net(images, tokens)
        with explain.capture_attention(net) as maps:
            captured = net(images, tokens)
        after = net(images, tokens)
    assert maps and torch.equal(plain, captured) and torch.equal(plain, after)
    assert all(not m._forward_hooks for m in explain.attention_sites(net).values())  # the hooks are gone


def test_columns_are_the_words_with_bpe_pieces_grouped():
    tokens = tokenize("the leftmost purplish skateboarder", 17)[0]
    assert int((tokens > 0).sum()) == 2 + 8  # 4 words in 8 BPE pieces: the grouping has work to do
    groups = explain.word_groups(tokens)
    assert [label for label, _ in groups] == ["<start>", "the", "leftmost", "purplish", "skateboarder", "<end>"]
    assert [span for _, span in groups] == [(0, 1), (1, 2), (2, 4), (4, 7), (7, 9), (9, 10)]
    cut = explain.word_groups(tokenize("the leftmost purplish skateboarder", 6, truncate=True)[0])
    assert [label for label, _ in cut] == ["<start>", "the", "leftmost", "pur", "<end>"]  # cut inside a word


def test_per_word_maps_average_word_queries_and_sum_word_keys():
    groups = explain.word_groups(tokenize("the leftmost cat", 6)[0])  # <start> the left most</w> cat <end>
    rng = np.random.default_rng(0)
    w = rng.random((2, 6, 9))  # 2 heads, 6 words reading a 3x3 image
    maps = explain.per_word_maps(w, groups, words_are_queries=True)
    assert maps.shape == (5, 3, 3)
    np.testing.assert_allclose(maps[2], w[:, 2:4].mean(axis=(0, 1)).reshape(3, 3), rtol=1e-6)
    maps = explain.per_word_maps(w.transpose(0, 2, 1), groups, words_are_queries=False)  # 9 pixels read 6 words
    np.testing.assert_allclose(maps[2], w[:, 2:4].sum(axis=1).mean(axis=0).reshape(3, 3), rtol=1e-6)


def test_a_single_hot_cell_is_drawn_at_its_place():
    net = tiny("tiny-ViT", input_size=96)  # a 6x6 grid everywhere
    expl = explain.explain(net, np.full((80, 120, 3), 128, np.uint8), "the leftmost purplish skateboarder")
    g, tile, cells = 6, 100, {"bridger_stage2_words_read_image": ("purplish", 1, 4),
                              "ga_layer3_pixels_read_words": ("leftmost", 5, 2)}
    for site, (word, r, c) in cells.items():
        w = np.zeros_like(expl["maps"][site])  # [heads, Lq, Lk]
        a, b = dict(expl["words"])[word]
        if site.startswith("bridger"):
            w[:, :, 0] = 1.0  # every word looks at cell 0 ...
            w[:, a:b, 0], w[:, a:b, r * g + c] = 0.0, 1.0  # ... except this one, at (r, c)
        else:
            w[:, :, 0] = 1.0  # every pixel reads the start token ...
            w[:, r * g + c, 0], w[:, r * g + c, a:b] = 0.0, 1.0 / (b - a)  # ... except pixel (r, c), this word
        expl["maps"][site] = w
    fig, layout = explain.draw_figure(expl, tile)
    assert layout["columns"] == ["<start>", "the", "leftmost", "purplish", "skateboarder", "<end>"]
    for site, (word, r, c) in cells.items():
        y, x, size = layout["tiles"][(site, word)]
        grey = cv2.cvtColor(fig[y:y + size, x:x + size], cv2.COLOR_BGR2GRAY).astype(int)
        ys, xs = np.nonzero(grey == grey.max())
        cell = size / g  # 16.7 px: the nearest resize puts cell edges within a pixel of these
        assert ys.min() >= r * cell - 1 and ys.max() <= (r + 1) * cell and xs.min() >= c * cell - 1 and \
            xs.max() <= (c + 1) * cell, (site, ys.min(), ys.max(), xs.min(), xs.max())
        assert len(ys) >= (cell - 2) ** 2  # the whole cell, not a stray pixel
        y, x, size = layout["tiles"][(site, "the")]  # a word that looks nowhere near (r, c): dark there
        assert cv2.cvtColor(fig[y:y + size, x:x + size], cv2.COLOR_BGR2GRAY)[int((r + .5) * cell),
                                                                               int((c + .5) * cell)] < grey.max() / 3


def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "photo.png")
    cv2.imwrite(path, rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    return path


def test_cli_writes_figure_and_maps_next_to_the_image_never_over_an_earlier_result(tmp_path, monkeypatch):
    net = tiny("tiny-ViT")
    ckpt = str(tmp_path / "best.pth")
    save_checkpoint(ckpt, net)
    image = image_file(tmp_path)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["--checkpoint", ckpt, "--image", image, "--text", "the leftmost cat!", "--device", "cpu", "--tile", "64"]
    first, second = explain.main(argv), explain.main(argv)
    assert first == str(tmp_path / "photo_the-leftmost-cat_explain")
    assert second == str(tmp_path / "photo_the-leftmost-cat_2_explain")
    assert not list(elsewhere.iterdir())  # nothing in the current folder
    assert cv2.imread(first + ".png").shape[1] == explain.LABEL_W + 6 * (64 + explain.GAP) + explain.GAP
    saved = np.load(first + ".npz")
    assert list(saved["words"]) == ["<start>", "the", "leftmost", "cat", "!", "<end>"]
    assert saved["ga_layer1_pixels_read_words"].shape == (8, 16, 17)  # heads, 4x4 pixels, 17 tokens
    assert saved["ga_layer1_pixels_read_words_per_word"].shape == (6, 4, 4)
    assert saved["bridger_stage3_words_read_image"].shape == (8, 17, 16)
    assert saved["mask"].shape == (50, 70) and saved["probability"].shape == (16, 16)
    with pytest.raises(UserError, match="threshold"):
        explain.main(argv + ["--threshold", "1.5"])
    with pytest.raises(UserError, match="text is empty"):
        explain.main(argv[:4] + ["--text", " ", "--device", "cpu"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_an_authors_checkpoint_of_random_weights(backbone, tmp_path):
    clip_path = str(tmp_path / "clip.pt")
    torch.save(random_clip_state_dict(backbone, seed=3), clip_path)
    torch.manual_seed(4)
    net = build_model(backbone, clip_path, input_size=64, word_len=17).eval()
    authors = str(tmp_path / "authors.pth")
    torch.save({"epoch": 50, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, authors)
    image = image_file(tmp_path)
    stem = explain.main(["--checkpoint", authors, "--backbone", backbone, "--clip-weights", clip_path,
                         "--input-size", "64", "--image", image, "--text", "the red circle", "--device", "cpu",
                         "--out", str(tmp_path / "out")])
    saved = np.load(stem + ".npz")
    expected = explain.explain(net, cv2.cvtColor(cv2.imread(image), cv2.COLOR_BGR2RGB), "the red circle")
    for site, w in expected["maps"].items():
        np.testing.assert_allclose(saved[site], w, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(saved["mask"], expected["mask"])
    assert cv2.imread(stem + ".png") is not None


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        explain.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.35)" in text and "(default: 128)" in text and "default: the image's folder" in text
