"""The fast-path options keep the numbers: one visual pass per image for several sentences, activation
checkpointing of the frozen encoder; and benchmark.py's table writing."""
import pytest
import torch

from benchmark import random_clip_state_dict, write_row
from loss import segmentation_loss
from model import build_model


def tokens_for(n, word_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, word_len, dtype=torch.long)
    for b in range(n):
        k = 3 + b % 5
        tokens[b, 0], tokens[b, 1 + k] = 49406, 49407
        tokens[b, 1:1 + k] = torch.randint(1, 49405, (k,), generator=g)
    return tokens


@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_image_index_equals_repeated_images(backbone):
    torch.manual_seed(0)
    net = build_model(backbone, input_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    index = torch.tensor([0, 0, 1, 0, 1])
    tokens = tokens_for(5)
    with torch.no_grad():
        ref = net(images[index], tokens)
        out = net(images, tokens, image_index=index)
    assert out.shape == (5, 1, 16, 16)
    assert (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="image_index"):
        net(images, tokens, image_index=index[:3])


def test_checkpoint_backbone_same_loss_and_gradients():
    torch.manual_seed(0)
    net = build_model("tiny-ViT", input_size=64).train()
    images, tokens = torch.randn(2, 3, 64, 64), tokens_for(2)
    mask = (torch.rand(2, 1, 64, 64) > 0.5).float()

    def grads():
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same GA dropout both times
        loss = segmentation_loss(net(images, tokens), mask)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    loss_plain, g_plain = grads()
    net.checkpoint_backbone()
    loss_ckpt, g_ckpt = grads()
    net.checkpoint_backbone(False)
    assert abs(loss_plain - loss_ckpt) < 1e-6
    assert g_plain.keys() == g_ckpt.keys() and "backbone.visual.positional_embedding" in g_plain
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_ckpt[n], atol=1e-6, rtol=1e-5), n


def test_random_clip_state_dict_names():
    assert random_clip_state_dict("tiny-RN")["visual.layer1.0.conv1.weight"].shape == (16, 16, 1, 1)
    with pytest.raises(ValueError, match="unknown backbone"):
        random_clip_state_dict("ViT-L/14")


def test_write_row_keeps_other_sections(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## data loader\n\n| a |\n|---|\n| 1 |\n")
    header = "| x | y |\n|---|---|"
    write_row(str(path), header, "| 1 | 2 |")
    write_row(str(path), header, "| 3 | 4 |")
    text = path.read_text()
    assert "## data loader\n\n| a |\n|---|\n| 1 |" in text
    assert text.count("## benchmark") == 1 and text.count("| x | y |") == 1
    assert text.index("| 1 | 2 |") < text.index("| 3 | 4 |")
    assert text.rstrip().endswith("| 3 | 4 |")
