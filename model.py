"""
ETRIS (Xu et al., ICCV 2023, Fig. 2): frozen CLIP encoders (`backbone`) bridged by the trainable Bridger
(`bridger`), then the HA neck (`neck`), the GA decoder (`decoder`) and the Projector (`proj`), which
outputs mask logits at stride 4. Only the Bridger, the decoder side and CLIP's positional embeddings are
trained. Module and parameter names are the authors', so their released checkpoints load strictly.

Also here: building by backbone name, checkpoint loading (ours or the authors'), what our checkpoints
save, and parameter counts.
"""
import collections
import os

import torch
import torch.nn as nn

from bridger import Bridger
from clip_loader import build_clip, load_clip_state_dict, tiny_clip_state_dict
from decoder import GA, HA, Projector

BACKBONES = ("ViT-B/16", "RN50", "RN101", "tiny-ViT", "tiny-RN")


class ETRIS(nn.Module):
    """images [B, 3, S, S] + tokens [B, L] (L <= word_len, 0 = padding) -> mask logits [B, 1, S/4, S/4].

    Every width is read from the CLIP weights: for the paper's backbones this gives the authors' config
    (ViT-B/16: fpn_in 768,768,512; RN50: 512,1024,1024; RN101: 512,1024,512; decoder width 512 = the
    text width, which GA needs since the word features enter its cross-attention unprojected)."""

    def __init__(self, backbone, ladder_dim=64, bridger_stages=(0, 1, 2), zoom="conv", frozen_bn_stats=False):
        super().__init__()
        sd = backbone.state_dict()
        vit = "visual.proj" in sd
        txt_dim = sd["ln_final.weight"].shape[0]
        embed = sd["text_projection"].shape[1]
        if vit:
            width = sd["visual.conv1.weight"].shape[0]
            vis_dims, fpn_in, strides, heads = (width,) * 3, (width, width, embed), (1, 1, 1), 8
            blocks = {"visual": len(backbone.visual.transformer.resblocks)}
        else:
            vis_dims = tuple(sd[f"visual.layer{i}.0.conv3.weight"].shape[0] for i in (2, 3, 4))
            # layer2 (stride 8) is zoomed down and layer4 (stride 32) up to layer3's stride 16
            fpn_in, strides, heads = (vis_dims[0], vis_dims[1], embed), (2, 1, 2), 4
            blocks = {}
        blocks["text"] = len(backbone.transformer.resblocks)
        for name, n in blocks.items():
            if n < 3 or n % 3:
                raise ValueError(f"the Bridger taps the CLIP {name} encoder after every third of its blocks, "
                                 f"so it needs a multiple of 3 blocks; these weights have {n}")
        self.word_len = backbone.word_len
        self.frozen_bn_stats = frozen_bn_stats

        self.backbone = backbone
        for name, p in backbone.named_parameters():
            p.requires_grad_("positional_embedding" in name)  # the authors train CLIP's position embeddings
        self.bridger = Bridger(vit, vis_dims, txt_dim, ladder_dim, heads, strides, bridger_stages, zoom)
        self.neck = HA(fpn_in, embed, dim=txt_dim, strides=strides)
        self.decoder = GA(num_layers=3, dim=txt_dim, heads=8, ffn_dim=512, dropout=0.1)
        self.proj = Projector(embed, txt_dim // 2)
        self.train()  # puts the backbone BNs in the mode frozen_bn_stats asks for

    def train(self, mode=True):
        # like the authors', the frozen ResNet's BatchNorms follow the train/eval mode (their running
        # statistics move during training); frozen_bn_stats keeps them in eval mode instead
        super().train(mode)
        if self.frozen_bn_stats:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def checkpoint_backbone(self, enabled=True):
        """Activation checkpointing of the frozen CLIP blocks (ViT/text blocks, ResNet layers): their
        activations are recomputed in backward instead of kept, for memory; same numbers. Off by default."""
        self.bridger.checkpoint_blocks = enabled
        return self

    def forward(self, images, tokens, image_index=None):
        """image_index [B] (optional, for evaluating several sentences per image): images is [N, 3, S, S] and
        sentence b is segmented in images[image_index[b]]; same logits as repeating the images, with the
        text-independent first third of the visual encoder run once per image."""
        if tokens.dim() != 2 or tokens.shape[1] > self.word_len:
            raise ValueError(f"tokens must be [B, L] with L <= word_len={self.word_len}, got {tuple(tokens.shape)}: "
                             f"tokenize with context_length=word_len")
        if image_index is not None and image_index.shape != tokens.shape[:1]:
            raise ValueError(f"image_index must have one entry per token row ({tokens.shape[0]}), "
                             f"got shape {tuple(image_index.shape)}")
        pad_mask = tokens == 0  # [B, L]
        maps, words, state = self.bridger(images, tokens, self.backbone, image_index)
        x = self.neck(maps, state)  # [B, D, S/16, S/16]
        x = self.decoder(x, words, pad_mask)
        return self.proj(x, state)  # [B, 1, S/4, S/4]


def build_model(backbone="ViT-B/16", clip_weights=None, input_size=416, word_len=17, ladder_dim=64,
                bridger=True, bridger_stages=(0, 1, 2), zoom="conv", frozen_bn_stats=False):
    """ETRIS on a CLIP backbone. backbone: one of BACKBONES ('tiny-*' are small random CLIPs for tests and
    the demo). clip_weights: None (OpenAI's file for the name, from the cache), a path, or a state dict.
    Ablations: bridger=False gives plain CLIP features (no Bridger parameters), ladder_dim is the Bridger
    width, bridger_stages which of the three stages carry a bridge, zoom 'conv' (paper) | 'linear' | 'mlp'."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: valid backbones are {', '.join(BACKBONES)}")
    config = dict(backbone=backbone, clip_weights=os.fspath(clip_weights) if isinstance(clip_weights, (str, os.PathLike)) else None,
                  input_size=input_size, word_len=word_len, ladder_dim=ladder_dim, bridger=bridger,
                  bridger_stages=tuple(bridger_stages), zoom=zoom, frozen_bn_stats=frozen_bn_stats)
    if isinstance(clip_weights, dict):
        sd = clip_weights
    elif clip_weights is not None:
        sd = load_clip_state_dict(os.fspath(clip_weights))
    elif backbone.startswith("tiny-"):
        sd = tiny_clip_state_dict(backbone[len("tiny-"):])
    else:
        sd = load_clip_state_dict(backbone)
    if ("visual.proj" in sd) != ("ViT" in backbone):
        raise ValueError(f"backbone {backbone!r} is a {'ViT' if 'ViT' in backbone else 'ResNet'} but the CLIP weights "
                         f"given are a {'ViT' if 'visual.proj' in sd else 'ResNet'}: pass matching weights")
    if "visual.proj" not in sd and input_size % 32:
        raise ValueError(f"input_size {input_size} must be a multiple of 32 for a ResNet backbone")
    clip = build_clip(sd, word_len, input_size)
    net = ETRIS(clip, ladder_dim, tuple(bridger_stages) if bridger else (), zoom, frozen_bn_stats)
    net.config = config
    return net


def _frozen_clip_keys(net):
    """State-dict keys restored by reloading the CLIP weights: frozen backbone parameters, except the
    randomly initialised attnpool.connect branch, which only checkpoints hold."""
    return {"backbone." + k for k, p in net.backbone.named_parameters()
            if not p.requires_grad and not k.startswith("visual.attnpool.connect.")}


def checkpoint_state_dict(net):
    """What our checkpoints save: every tensor of net.state_dict() that the CLIP file does not give back,
    i.e. trainable parameters (Bridger, decoder side, positional embeddings), attnpool.connect.* and all
    buffers (BN running statistics, which move in training, also the frozen ResNet's)."""
    skip = _frozen_clip_keys(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k not in skip}


def _describe(keys, limit=8):
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_checkpoint(path, mmap=False):
    """torch.load without running arbitrary pickled code. The authors' files also pickle their
    MultiStepLR state, whose milestones are a collections.Counter: the one non-tensor type allowed."""
    with torch.serialization.safe_globals([collections.Counter]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            raise RuntimeError(f"cannot read checkpoint {path}: not a torch checkpoint, or it pickles "
                               f"objects other than tensors and plain containers ({e})") from None


def load_checkpoint(net, path_or_dict):
    """Load a checkpoint into net, strictly: ours (checkpoint_state_dict, maybe nested under 'state_dict')
    or the authors' (DDP keys 'module.*' under 'state_dict'). Keys may be missing only if they are frozen
    CLIP tensors (then net keeps the ones loaded from clip_weights). Returns the loaded object (a dict:
    epoch, optimizer, ... if the file has them)."""
    if isinstance(path_or_dict, dict):
        ckpt = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} not found")
        ckpt = read_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("checkpoint is not a state dict (nor a dict with a 'state_dict' entry)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = net.state_dict()
    unexpected = set(sd) - set(own)
    missing = set(own) - set(sd) - _frozen_clip_keys(net)
    shapes = {k for k in set(sd) & set(own) if sd[k].shape != own[k].shape}
    if unexpected or missing or shapes:
        problems = []
        if unexpected:
            problems.append(f"unexpected keys: {_describe(unexpected)}")
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if shapes:
            problems.append("shape mismatches: " + _describe(
                f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes))
        backbone = getattr(net, "config", {}).get("backbone", "?")
        raise RuntimeError(f"checkpoint does not fit this ETRIS model (backbone {backbone}); was it trained "
                           f"with another backbone or config? " + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
    return ckpt


def parameter_counts(net):
    """Parameter counts; updated_backbone_pct is the Bridger's size as a percentage of the CLIP backbone's
    (the paper's "updated backbone parameters": the authors count the Bridger as the backbone update)."""
    def count(params):
        return sum(p.numel() for p in params)
    total = count(net.parameters())
    trainable = count(p for p in net.parameters() if p.requires_grad)
    bridger = count(net.bridger.parameters())
    decoder = count(net.neck.parameters()) + count(net.decoder.parameters()) + count(net.proj.parameters())
    return dict(total=total, frozen=total - trainable, trainable=trainable, bridger=bridger, decoder=decoder,
                updated_backbone_pct=100.0 * bridger / count(net.backbone.parameters()))


def format_parameter_counts(counts):
    return (f"parameters: total {counts['total']:,} | frozen {counts['frozen']:,} | trainable {counts['trainable']:,}\n"
            f"  bridger {counts['bridger']:,} ({counts['updated_backbone_pct']:.2f}% of the backbone) | "
            f"decoder (neck + GA + projector) {counts['decoder']:,}")
