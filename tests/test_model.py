"""ETRIS model tests: golden parity with the authors' code, the paper's Bridger sizes, freezing, checkpoints
(ours and the authors' DDP format), bad input, ablation flags and the loss. Tiny CLIPs only (seconds)."""
import os

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch 2.6's checkpoint imports it on first use, making CPU tensors)
import torch.nn as nn
import torch.nn.functional as F

from bridger import Bridger, PixelwiseZoom
from checkpoint import load_checkpoint, trainable_state_dict
from clip_loader import BACKBONES, random_clip_state_dict
from decoder import Projector
from errors import UserError
from layers import GatedCrossAttention, TransformerInteractor
from loss import segmentation_loss
from model import build_model, format_parameter_counts, parameter_counts, print_shape_walk, shape_walk
from tokenizer import tokenize
from tools.parity import fill_

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SIZE, WORD_LEN = 64, 17


def tokens_for(batch=2, word_len=WORD_LEN, lengths=(15, 4)):
    """sot, a few word ids, eot, zero padding (one sentence fills word_len when lengths[0] = word_len - 2)."""
    g = torch.Generator().manual_seed(7)
    t = torch.zeros(batch, word_len, dtype=torch.long)
    for b, n in enumerate(lengths[:batch]):
        t[b, 0], t[b, n + 1] = 49406, 49407
        t[b, 1:n + 1] = torch.randint(1, 49405, (n,), generator=g)
    return t


def images_for(batch=2, size=SIZE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def clip_rn():
    return random_clip_state_dict("tiny-RN", seed=0)


@pytest.fixture(scope="module")
def clip_vit():
    return random_clip_state_dict("tiny-ViT", seed=0)


def tiny(backbone, sd, **kw):
    torch.manual_seed(0)
    return build_model(backbone, clip_weights=sd, input_size=SIZE, word_len=WORD_LEN, **kw)


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("fixture", ["parity_vit.pt", "parity_rn.pt"])
def test_golden_parity_with_authors_code(fixture):
    """The authors' model (their code, run once by a script outside the repo) and ours, both with every
    tensor filled by tools/parity.py, give the same logits in fp32 eval mode."""
    ref = torch.load(os.path.join(FIXTURES, fixture))
    sd = {k: torch.zeros(s, dtype=getattr(torch, ref["clip_dtypes"][k].split(".")[1]))
          for k, s in ref["clip_shapes"].items()}
    net = build_model("tiny-ViT" if ref["case"] == "tinyvit" else "tiny-RN", clip_weights=sd,
                      input_size=ref["input_size"], word_len=ref["word_len"])
    # same module tree as the authors': every name and shape of their state dict, nothing more
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == ref["state_shapes"]
    assert parameter_counts(net)["bridger"] == ref["bridger_params"]
    fill_(net)
    with torch.no_grad():
        logits = net.eval()(ref["images"], ref["tokens"])
    assert logits.shape == ref["logits"].shape == (2, 1, ref["input_size"] // 4, ref["input_size"] // 4)
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4
    assert ref["logits"].abs().max().item() > 1.0  # the comparison is not between near-zero maps


def test_bridger_parameter_counts_match_paper():
    count = lambda m: sum(p.numel() for p in m.parameters())
    vit = Bridger(True, (768, 768, 768), 512, dim=64, heads=8, strides=(1, 1, 1))  # ViT-B/16 widths
    rn = Bridger(False, (512, 1024, 2048), 512, dim=64, heads=4, strides=(2, 1, 2))  # RN50/RN101 widths
    assert count(vit) == 598_592
    assert count(rn) == 1_942_080
    # hidden size 32 (hand count: 6 attentions 4,224 + text projections 3x33,312 + zooms 3x50,752 + 4 LNs 64)
    assert count(Bridger(True, (768,) * 3, 512, dim=32, heads=8)) == 277_792


# ---------------------------------------------------------------------------------------------- training

def test_gradients_reach_only_trainable_parameters(clip_rn):
    net = tiny("tiny-RN", clip_rn).train()
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    backbone_trainable = {k for k in trainable if k.startswith("backbone.")}
    assert backbone_trainable == {"backbone.positional_embedding", "backbone.visual.attnpool.positional_embedding"}
    assert all(k.startswith(("bridger.", "neck.", "decoder.", "proj.")) for k in trainable - backbone_trainable)
    logits = net(images_for(), tokens_for())
    segmentation_loss(logits, (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()).backward()
    for k, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, k
        else:
            assert p.grad is None, k


@pytest.mark.parametrize("frozen_bn_stats", [False, True])
def test_adam_step_leaves_frozen_tensors_identical(clip_rn, frozen_bn_stats):
    net = tiny("tiny-RN", clip_rn, frozen_bn_stats=frozen_bn_stats).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    segmentation_loss(net(images_for(), tokens_for()), torch.ones(2, 1, SIZE, SIZE)).backward()
    opt.step()
    after = net.state_dict()
    for k, p in net.named_parameters():
        assert torch.equal(before[k], after[k]) != p.requires_grad, k  # frozen: bit-identical; trained: moved
    stats = [k for k in before if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    assert stats  # stem, bottlenecks, attnpool.connect
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    # the authors keep the frozen ResNet's BN layers in train mode: their running statistics move
    assert moved == ([] if frozen_bn_stats else stats)
    # the decoder side's BN statistics move either way
    assert not torch.equal(before["neck.aggr.1.running_mean"], after["neck.aggr.1.running_mean"])
    assert net.backbone.visual.bn1.training == (not frozen_bn_stats)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_authors_checkpoint_format_loads_strictly(clip_vit, tmp_path):
    src = tiny("tiny-ViT", clip_vit)
    fill_(src)
    path = tmp_path / "best_model.pth"
    # their train.py: torch.save of a dict whose 'state_dict' is a DDP model's (keys 'module.*'), next to
    # the optimizer and the MultiStepLR state (its milestones are a collections.Counter)
    opt = torch.optim.Adam([p for p in src.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[35], gamma=0.1)
    torch.save({"epoch": 3, "best_iou": 0.5, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = tiny("tiny-ViT", clip_vit)
    ckpt = load_checkpoint(dst, str(path))
    assert ckpt["epoch"] == 3
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    x, t = images_for(), tokens_for()
    with torch.no_grad():
        assert torch.equal(src.eval()(x, t), dst.eval()(x, t))


def test_checkpoint_that_pickles_code_is_refused(clip_vit, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(UserError, match="evil.pth"):
        load_checkpoint(tiny("tiny-ViT", clip_vit), str(path))


def test_trainable_state_dict_round_trip(clip_rn):
    net = tiny("tiny-RN", clip_rn).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    segmentation_loss(net(images_for(), tokens_for()), torch.ones(2, 1, SIZE, SIZE)).backward()
    opt.step()  # moves trainable tensors and BN statistics away from a fresh build
    saved = trainable_state_dict(net)
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    buffers = {k for k, _ in net.named_buffers()} & set(net.state_dict())  # the persistent ones
    connect = {k for k in net.state_dict() if ".attnpool.connect." in k}
    assert set(saved) == trainable | buffers | connect
    assert "backbone.visual.layer1.0.conv1.weight" not in saved  # frozen CLIP: reloaded from clip_weights
    fresh = tiny("tiny-RN", clip_rn)
    load_checkpoint(fresh, {"state_dict": saved})
    x, t = images_for(), tokens_for()
    with torch.no_grad():
        assert torch.equal(net.eval()(x, t), fresh.eval()(x, t))


def test_checkpoint_of_other_family_is_refused_naming_keys(clip_rn, clip_vit):
    vit_ckpt = trainable_state_dict(tiny("tiny-ViT", clip_vit))
    with pytest.raises(UserError, match=r"unexpected keys: .*backbone\.visual\.(class_embedding|positional_embedding)"):
        load_checkpoint(tiny("tiny-RN", clip_rn), vit_ckpt)
    rn = tiny("tiny-RN", clip_rn)
    bad = trainable_state_dict(rn)
    bad["proj.txt.bias"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"shape mismatches: proj\.txt\.bias \(3,\) vs model"):
        load_checkpoint(rn, bad)
    del bad["proj.txt.bias"]
    with pytest.raises(UserError, match=r"missing keys: proj\.txt\.bias"):
        load_checkpoint(rn, bad)
    with pytest.raises(UserError, match="nowhere.pth"):
        load_checkpoint(rn, "/nonexistent/nowhere.pth")


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors(clip_rn, clip_vit):
    net = tiny("tiny-RN", clip_rn)
    with pytest.raises(ValueError, match="word_len=17"):
        net(images_for(), tokens_for(word_len=18))
    with pytest.raises(UserError, match=r"valid backbones are ViT-B/16, RN50, RN101, tiny-ViT, tiny-RN"):
        build_model("ViT-L/14", clip_weights=clip_vit)
    with pytest.raises(UserError, match="ViT but the CLIP weights given are a ResNet"):
        build_model("tiny-ViT", clip_weights=clip_rn, input_size=SIZE)
    with pytest.raises(UserError, match=r"word_len must be in 1..77, got 78"):
        build_model("tiny-ViT", clip_weights=clip_vit, input_size=SIZE, word_len=78)
    with pytest.raises(UserError, match="read from the CLIP weights"):
        build_model("tiny-ViT", clip_weights=clip_vit, input_size=SIZE, text_dim=32)
    with pytest.raises(UserError, match="zoom"):
        tiny("tiny-RN", clip_rn, zoom="pool")
    # shorter token sequences are fine (the causal mask is cut to L)
    assert net.eval()(images_for(), tokens_for(word_len=10, lengths=(8, 4))).shape == (2, 1, 16, 16)
    assert BACKBONES == ("ViT-B/16", "RN50", "RN101", "tiny-ViT", "tiny-RN")


# ---------------------------------------------------------------------------------------------- ablations

def test_ablation_flags(clip_rn, clip_vit):
    x, t = images_for(), tokens_for()
    base = tiny("tiny-ViT", clip_vit)
    counts = parameter_counts(base)
    assert counts["total"] == counts["frozen"] + counts["trainable"]
    assert counts["trainable"] == counts["bridger"] + counts["decoder"] + 64 * 77 + 64 * 17  # + text/visual pos
    image_encoder = sum(p.numel() for p in base.backbone.visual.parameters())
    assert counts["bridger_pct"] == 100 * counts["bridger"] / image_encoder  # the paper's measure (Table 3)
    assert f"Bridger {counts['bridger']:,} ({counts['bridger_pct']:.2f}% of the image encoder's {image_encoder:,})" \
        in format_parameter_counts(counts)
    fill_(base)
    with torch.no_grad():
        ref = base.eval()(x, t)

    # no Bridger: no Bridger parameters, plain CLIP features feed the same decoder
    plain = tiny("tiny-ViT", clip_vit, bridger_stages=())
    assert parameter_counts(plain)["bridger"] == 0 and not any(k.startswith("bridger.") for k in plain.state_dict())
    assert plain.config.bridger_stages == ()
    fill_(plain)
    with torch.no_grad():
        out = plain.eval()(x, t)
    assert out.shape == ref.shape and (out - ref).abs().max() > 1e-3

    # hidden size: 32 instead of 64 shrinks every Bridger layer
    small = tiny("tiny-ViT", clip_vit, bridger_dim=32)
    assert small.bridger.linear1["0"].out_features == 32
    assert parameter_counts(small)["bridger"] < counts["bridger"]

    # stages: only stages 1 and 2 bridged, stage 2 normalised with stage 1's fused input as the authors' do
    late = tiny("tiny-RN", clip_rn, bridger_stages=(1, 2))
    keys = {k.split(".")[1] + "." + k.split(".")[2] for k in late.state_dict() if k.startswith("bridger.")}
    assert {"zoom_in.1", "zoom_in.2", "ln_v.1", "ln_t.1"} <= keys
    assert not {"zoom_in.0", "linear1.0", "fusion_v.0", "ln_v.0"} & keys
    assert late(x, t).shape == (2, 1, 16, 16)

    # zoom variants: conv (BN+ReLU for ViT, bare for ResNet), or per-pixel linear / MLP with resampling
    assert isinstance(base.bridger.zoom_in["0"][0], nn.Conv2d) and isinstance(base.bridger.zoom_in["2"][0], nn.ConvTranspose2d)
    assert isinstance(tiny("tiny-RN", clip_rn).bridger.zoom_in["0"], nn.Conv2d)
    assert isinstance(base.bridger.fusion_v["0"], GatedCrossAttention)
    assert isinstance(tiny("tiny-RN", clip_rn).bridger.fusion_v["0"], TransformerInteractor)
    for kind, rn_modules in (("linear", 1), ("mlp", 2)):
        net = tiny("tiny-RN", clip_rn, zoom=kind)
        zoom = net.bridger.zoom_in["0"]
        assert isinstance(zoom, PixelwiseZoom) and sum(isinstance(m, nn.Linear) for m in zoom.modules()) == rn_modules
        assert net(x, t).shape == (2, 1, 16, 16)
    # RN zoom strides 2,1,2: every stage fuses at layer3's resolution (stride 16)
    z = PixelwiseZoom(128, 64, 64, stride=2, up=False, kind="linear")
    assert z(torch.randn(1, 128, 8, 8)).shape == (1, 64, 4, 4)
    assert PixelwiseZoom(512, 64, 64, stride=2, up=True, kind="mlp")(torch.randn(1, 512, 2, 2)).shape == (1, 64, 4, 4)


def per_sample_conv(pixels, kernels):
    """The authors' formulation of the Projector's dynamic conv: one 3x3 conv (out 1 channel, with bias) per sample."""
    C = pixels.shape[1]
    return torch.cat([F.conv2d(pixels[b:b + 1], kernels[b, :-1].reshape(1, C, 3, 3), kernels[b, -1:], padding=1)
                      for b in range(len(pixels))])


def test_projector_applies_each_sample_its_own_kernel():
    """The dynamic conv against the authors' formulation, one 3x3 conv (out 1 channel, with bias) per sample, in
    float64: the same logits and the same gradients for the pixels and the sentence kernels."""
    torch.manual_seed(0)
    proj = Projector(sentence_dim=16, dim=8).double()
    pixels = torch.randn(3, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 8 * 9 + 1, dtype=torch.float64, requires_grad=True)
    proj.vis, proj.txt = nn.Identity(), nn.Identity()  # feed the pixel features and kernels directly
    ours = proj(pixels, kernel)
    theirs = per_sample_conv(pixels, kernel)
    assert ours.shape == theirs.shape == (3, 1, 5, 6)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    g = torch.randn_like(ours)
    grads = [torch.autograd.grad(out, (pixels, kernel), g) for out in (ours, theirs)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert theirs.abs().max() > 1


def test_projector_upsampling_stack_in_channels_last_equals_nchw():
    """The Projector runs its upsampling and convs channels-last (faster on the CPU): in float64 its logits and
    gradients equal the same layers run on NCHW maps, followed by one 3x3 conv per sample."""
    torch.manual_seed(0)
    proj = Projector(sentence_dim=16, dim=8).double().train()
    pixels = torch.randn(3, 16, 4, 5, dtype=torch.float64, requires_grad=True)
    sentence = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    ours = proj(pixels, sentence)
    x = pixels
    for layer in proj.vis:  # NCHW throughout
        x = layer(x)
    assert x.is_contiguous() and x.shape == (3, 8, 16, 20)
    theirs = per_sample_conv(x, proj.txt(sentence))
    assert ours.shape == (3, 1, 16, 20) and ours.is_contiguous()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12) and theirs.abs().max() > 0.1
    g = torch.randn_like(ours)
    inputs = (pixels, sentence, proj.vis[1][0].weight)
    for a, b in zip(*[torch.autograd.grad(out, inputs, g) for out in (ours, theirs)]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_training_graph_copies_no_whole_tensors(backbone):
    """No in-place op on a view in the trained path: autograd would record a CopySlices node and copy the whole
    base tensor in backward (a ReLU in place on a Linear's 3-D output in the GA FFN would: a few % of the demo's
    step)."""
    torch.manual_seed(0)
    net = build_model(backbone, input_size=SIZE, word_len=WORD_LEN, ga_dropout=0.0, bridger_dropout=0.0).train()
    logits = net(images_for(), tokens_for())
    names, seen, todo = [], set(), [logits.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        todo.extend(n for n, _ in node.next_functions)
    assert any("ConvolutionBackward" in n for n in names) and len(names) > 100  # the whole graph was walked
    assert not [n for n in names if "CopySlices" in n]


# ---------------------------------------------------------------------------------------------- loss

def test_segmentation_loss_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g)
    # nearest downsampling by 4 picks source pixel floor(i * 16 / 4) = 4i
    target = mask[:, :, ::4, ::4]
    p = torch.sigmoid(logits.double())
    expected = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert abs(segmentation_loss(logits, mask).item() - expected.item()) < 1e-6
    assert torch.equal(segmentation_loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))


def test_loss_keeps_the_soft_mask_in_float32_under_autocast():
    # letterboxed masks have soft edges (0.3 here); bf16 would round the target to 0.30078125 (fp16: 0.2998)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 1, 8, 8, generator=g)).to(torch.bfloat16)
    mask = torch.full((2, 1, 8, 8), 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = segmentation_loss(logits, mask)
    assert loss.dtype == torch.float32
    x, t = logits.double(), mask.double()
    exact = (torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean()
    assert abs(loss.item() - exact.item()) < 1e-6
    rounded = F.binary_cross_entropy_with_logits(logits.float(), mask.to(torch.bfloat16).float())
    assert abs(rounded.item() - exact.item()) > 1e-4  # what rounding the target would have cost


# ---------------------------------------------------------------------------------------------- fast paths

@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_image_index_equals_repeated_images(backbone):
    torch.manual_seed(0)
    net = build_model(backbone, input_size=SIZE).eval()
    images = images_for(batch=2)
    index = torch.tensor([0, 0, 1, 0, 1])
    tokens = torch.cat([tokens_for(2), tokens_for(2, lengths=(3, 9)), tokens_for(1, lengths=(6,))])
    with torch.no_grad():
        ref = net(images[index], tokens)
        out = net(images, tokens, image_index=index)
    assert out.shape == (5, 1, SIZE // 4, SIZE // 4)
    assert (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="image_index"):
        net(images, tokens, image_index=index[:3])


@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_grad_checkpointing_leaves_weights_and_bn_statistics_identical(backbone):
    """One Adam step with the frozen encoder's activations recomputed in backward equals one without, bit for
    bit, BatchNorm running statistics included (a recomputed train-mode BN must not update them twice)."""
    images, tokens = images_for(), tokens_for()
    mask = (torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    states = []
    for recompute in (False, True):
        torch.manual_seed(0)
        net = build_model(backbone, input_size=SIZE, word_len=WORD_LEN).train().set_grad_checkpointing(recompute)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(1)  # the same dropout masks
        segmentation_loss(net(images, tokens), mask).backward()
        opt.step()
        states.append(net.state_dict())
    plain, recomputed = states
    assert plain.keys() == recomputed.keys()
    for k in plain:
        assert torch.equal(plain[k], recomputed[k]), k
    bn_tracked = [k for k in plain if k.startswith("backbone.") and k.endswith("num_batches_tracked")]
    assert all(plain[k].item() == 1 for k in bn_tracked) and (bn_tracked or backbone == "tiny-ViT")


class StrayTensors(torch.overrides.TorchFunctionMode):
    """Records every torch call during which a tensor argument or result is not on `device`."""

    def __init__(self, device):
        super().__init__()
        self.device, self.strays = torch.device(device), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [args, kwargs or {}, out]
        while stack:
            x = stack.pop()
            if isinstance(x, (list, tuple)):
                stack.extend(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, torch.Tensor) and x.device != self.device and x.numel():  # (torch 2.6's checkpoint
                # makes an empty CPU tensor as a marker: no data, so no copy)
                self.strays.append((getattr(func, "__name__", str(func)), tuple(x.shape), str(x.device)))
        return out


@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_every_tensor_forward_uses_moves_with_the_module(backbone):
    """No hidden host-device copies: on the 'meta' device (a stand-in for a GPU), forward touches meta tensors only,
    so nothing it uses stayed behind on the CPU (a plain tensor attribute, a cache) or is made there (torch.arange
    without a device). After .to(float64) the model computes in float64 throughout."""
    torch.manual_seed(0)
    net = build_model(backbone, input_size=SIZE, word_len=WORD_LEN).eval()
    images, tokens = images_for(), tokens_for()
    with torch.no_grad():
        ref = net(images.double().float(), tokens)
        out64 = net.to(torch.float64)(images.double(), tokens)
    assert out64.dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point())
    assert (out64 - ref).abs().max().item() < 1e-3 and ref.abs().max().item() > 1e-2
    net.to("meta")
    images, tokens, index = images.to("meta"), tokens.to("meta"), torch.tensor([0, 1], device="meta")
    mask = torch.zeros(2, 1, SIZE, SIZE, device="meta")
    watch = StrayTensors("meta")
    with torch.no_grad(), watch:
        out = net(images, tokens, image_index=index)
    assert out.device.type == "meta" and out.shape == (2, 1, SIZE // 4, SIZE // 4)
    net.train().set_grad_checkpointing()
    with watch:
        segmentation_loss(net(images, tokens), mask).backward()
    assert watch.strays == []


def test_dropouts_are_in_the_config_and_the_config_rebuilds_the_model(clip_rn, tmp_path):
    from dataclasses import asdict

    from checkpoint import load_model, save_checkpoint
    net = tiny("tiny-RN", clip_rn)
    assert net.config.ga_dropout == net.config.bridger_dropout == 0.1  # the authors' values
    assert net.decoder.layers[0].dropout == net.decoder.layers[0].ffn[2].p == 0.1
    assert net.bridger.fusion_v["0"].dropout == net.bridger.fusion_v["0"].self_attn.dropout == 0.1
    off = tiny("tiny-RN", clip_rn, ga_dropout=0.0, bridger_dropout=0.0)
    assert off.decoder.layers[0].ffn[2].p == 0.0 and off.bridger.fusion_t["2"].multihead_attn.dropout == 0.0
    x, t = images_for(), tokens_for()
    with torch.no_grad():
        torch.manual_seed(1)
        a = off.train()(x, t)
        torch.manual_seed(2)
        assert torch.equal(a, off(x, t))  # no dropout left: train mode is deterministic
    path = str(tmp_path / "off.pth")
    save_checkpoint(path, off)
    torch.save(clip_rn, tmp_path / "clip.pt")
    again = load_model(path, clip_weights=str(tmp_path / "clip.pt"))
    assert asdict(again.config) == {**asdict(off.config), "clip_weights": str(tmp_path / "clip.pt")}
    with torch.no_grad():
        assert torch.equal(again(x, t), off.eval()(x, t))


# ---------------------------------------------------------------------------------------------- the shape walk

@pytest.mark.parametrize("backbone", ["tiny-ViT", "tiny-RN"])
def test_shape_walk_gives_the_models_own_shapes_and_counts(backbone, clip_vit, clip_rn, capsys):
    net = tiny(backbone, clip_vit if backbone == "tiny-ViT" else clip_rn)
    rows = shape_walk(net, "the red circle", image=images_for()[:1])
    counts = parameter_counts(net)
    assert sum(r["trainable"] for r in rows) == counts["trainable"]  # every parameter counted once
    assert sum(r["frozen"] for r in rows) == counts["frozen"]
    assert sum(r["trainable"] for r in rows if r["block"].startswith("  Bridger")) == counts["bridger"]
    assert (rows[-1]["trainable"], rows[-1]["frozen"]) == (0, 1)  # logit_scale, all that ETRIS leaves unused
    c, g = net.config, SIZE // 16
    by_symbol = {r["symbol"]: r["shape"] for r in rows if r["symbol"]}
    strides = (2, 1, 2) if backbone == "tiny-RN" else (1, 1, 1)
    expected = {"f_t": (1, WORD_LEN, c.text_dim), "f_s": (1, c.embed_dim), "F_m": (1, c.text_dim, g, g),
                "F_coord": (1, 2, g, g), "F_v": (1, c.text_dim, g, g), "F_c": (1, c.text_dim, g, g),
                "Z_c": (1, c.text_dim // 2, SIZE // 4, SIZE // 4), "Z_t": (1, c.text_dim // 2 * 9 + 1)}
    for i, (dim, stride) in enumerate(zip(c.vision_dims, strides)):
        side = g * stride if i == 0 else g // stride  # ResNet: layer2 at stride 8, layer4 at stride 32
        expected[f"F_v^{i + 2}"] = (1, dim, side, side)  # the paper's prose counts the stages from 2
        expected[f"F_t^{i + 2}"] = (1, WORD_LEN, c.text_dim)
        expected[f"hat F_v^{i + 2}"] = (1, c.bridger_dim, g, g)  # every stage interacts at stride 16
        expected[f"f_v^{i + 1}"] = (1, dim, side, side) if i < 2 else (1, c.embed_dim, side, side)
    assert by_symbol == expected

    # the rows show the tensors HA and GA receive: recorded here by hooks of our own, in a forward of the same input
    received = {}
    net.neck.register_forward_pre_hook(lambda m, args: received.update(ha=[x.clone() for x in args[0]]))
    net.decoder.register_forward_pre_hook(lambda m, args: received.update(ga_words=args[1].clone()))
    with torch.no_grad():
        logits = net.eval()(images_for()[:1], tokenize("the red circle", WORD_LEN, truncate=True))
    row = {r["symbol"]: r["tensor"] for r in rows if r["symbol"]}
    for i in range(3):
        assert torch.equal(row[f"f_v^{i + 1}"], received["ha"][i])
    for i in range(2):  # HA reads the maps after the Bridger's residual, which differ from the maps it was given
        assert not torch.equal(row[f"F_v^{i + 2}"], received["ha"][i])
    ga_row = next(r for r in rows if r["block"].startswith("GA reads"))
    assert ga_row["symbol"] == "f_t" and torch.equal(ga_row["tensor"], received["ga_words"])
    xs = torch.linspace(-1, 1, g).expand(g, g)  # F_coord: x grows along a row, y down a column
    assert torch.equal(row["F_coord"], torch.stack([xs, xs.t()])[None])
    assert rows[-2]["block"] == "Projector: mask logits" and torch.equal(rows[-2]["tensor"], logits)
    print_shape_walk(net, "the red circle")
    printed = capsys.readouterr().out
    assert f"[1, {c.text_dim}, {g}, {g}]" in printed and printed.rstrip().endswith(
        format_parameter_counts(counts).splitlines()[-1])
