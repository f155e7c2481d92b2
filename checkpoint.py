"""
Checkpoint files, in one place: reading them without running pickled code, telling their kind (ours, the authors'
released checkpoints, CLIP weights given to the wrong option), loading them strictly into a model, and what ours
save.

Our checkpoints hold {"config": the model's ETRISConfig, "model": the tensors CLIP's file does not give back,
...training state}; they rebuild their model from the config and the CLIP weights it names. The authors' released
checkpoints hold {"state_dict": a DDP model's tensors ("module.*"), "optimizer", "scheduler", ...} and no config.
"""
import collections
import os
import zipfile
from dataclasses import asdict

import torch

from clip_loader import is_torchscript_archive
from errors import UserError
from model import ETRISConfig, build_model, model_from_config


# what each command line accepts as a trained ETRIS model, for the errors that refuse something else
ACCEPTED = ("a checkpoint that train.py writes (best.pth or last.pth, in exp/<data>/<backbone>/) or an authors' "
            "release (github.com/kkakkkka/ETRIS; with --backbone and --clip-weights)")


# what checkpoint_kind's answers are, for the errors that refuse a file
KINDS = {"clip": "a CLIP weights file (pass it as --clip-weights)", "etris-authors": "an authors' release",
         "unreadable": "not a readable torch file (a truncated download or copy?)",
         "unknown": "a torch file, but neither ours nor an authors' checkpoint"}


def read_checkpoint(path, mmap=False):
    """torch.load without running arbitrary pickled code. The authors' files also pickle their MultiStepLR state,
    whose milestones are a collections.Counter: the one non-tensor type allowed."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found: give {ACCEPTED}")
    with torch.serialization.safe_globals([collections.Counter]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            if not zipfile.is_zipfile(path):  # what torch.save writes, with its index at the end
                reason = "not a complete torch file: a truncated download or copy, or no checkpoint at all"
            else:
                lines = [ln for ln in str(e).splitlines() if "Unsupported global" in ln] or [type(e).__name__]
                reason = f"it pickles objects other than tensors and plain containers: {lines[0].strip()}"
            raise UserError(f"cannot read checkpoint {path}: {reason}; copy it again, or give {ACCEPTED}") from None


def checkpoint_kind(path):
    """'clip' (OpenAI archive or CLIP state dict), 'etris' (ours), 'etris-authors' (their release), 'unreadable' (not
    a torch file, or a truncated one) or 'unknown' (a torch file of something else). Turns a file passed to the wrong
    option into one clear error."""
    if not os.path.isfile(path):
        raise UserError(f"no file at {path!r}")
    if is_torchscript_archive(path):
        return "clip"  # OpenAI's release format
    try:
        obj = read_checkpoint(path, mmap=zipfile.is_zipfile(path))
    except UserError:
        return "unreadable"
    if not isinstance(obj, dict):
        return "unknown"
    if "config" in obj and "model" in obj:
        return "etris"
    sd = obj.get("state_dict", obj)
    keys = [k.removeprefix("module.") for k in sd] if isinstance(sd, dict) else []
    if any(k.startswith(("bridger.", "decoder.", "neck.")) for k in keys):
        return "etris-authors"
    if any(k.startswith("visual.") for k in keys) and "token_embedding.weight" in keys:
        return "clip"
    return "unknown"


def _frozen_clip_keys(net):
    """State-dict keys restored by reloading the CLIP weights: the frozen backbone parameters, except the randomly
    initialised attnpool.connect branch, which only checkpoints hold."""
    return {"backbone." + k for k, p in net.backbone.named_parameters()
            if not p.requires_grad and not k.startswith("visual.attnpool.connect.")}


def trainable_state_dict(net):
    """What our checkpoints save: every tensor of net.state_dict() that the CLIP file does not give back, i.e. the
    trained parameters (Bridger, decoder side, positional embeddings), attnpool.connect.* and all buffers (BN
    running statistics, which move in training, also the frozen ResNet's)."""
    skip = _frozen_clip_keys(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k not in skip}


def save_checkpoint(path, net, **state):
    """Our checkpoint of net (config + trainable_state_dict) and any training state, written to a temporary file
    then renamed: a kill leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"config": asdict(net.config), "model": trainable_state_dict(net), **state}, tmp)
    os.replace(tmp, path)


def _describe(keys, limit=8):
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(net, path_or_dict):
    """Load a checkpoint into net, strictly: ours (trainable_state_dict, maybe under 'model' or 'state_dict') or the
    authors' (DDP keys 'module.*' under 'state_dict'). Keys may be missing only if they are frozen CLIP tensors
    (net keeps those it loaded from the CLIP weights). Returns the loaded object."""
    ckpt = path_or_dict if isinstance(path_or_dict, dict) else read_checkpoint(os.fspath(path_or_dict))
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError("checkpoint is not a state dict (nor a dict with a 'model' or 'state_dict' entry)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
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
        raise UserError(f"checkpoint does not fit this ETRIS model (backbone {net.config.backbone}); was it trained "
                        f"with another backbone or config? " + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
    return ckpt


def saved_config(ckpt, path):
    """The ETRISConfig fields of our checkpoint, as a dict."""
    try:
        return asdict(ETRISConfig(**ckpt["config"]))
    except TypeError:
        raise UserError(f"{path} was written by another version of this code: its model config "
                        f"{sorted(ckpt['config'])} is not this version's ETRISConfig") from None


def load_model(checkpoint, backbone=None, clip_weights=None, input_size=None, word_len=17, device="cpu"):
    """ETRIS rebuilt from a checkpoint, in eval mode. Ours carry their config (an input_size given must be theirs);
    the authors' carry none, so `backbone` (and `clip_weights`, unless OpenAI's file is found by name) must be
    given, and input_size (default 416) and word_len are theirs."""
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found: give {ACCEPTED}")
    kind = checkpoint_kind(checkpoint)
    if kind == "clip":
        raise UserError(f"{checkpoint!r} is a CLIP weights file, not an ETRIS checkpoint: pass it as --clip-weights "
                        f"and give the trained ETRIS checkpoint as --checkpoint")
    if kind == "unreadable":
        read_checkpoint(checkpoint)  # raises, with the reason
    if kind == "unknown":
        raise UserError(f"{checkpoint!r} is a torch file but not a trained ETRIS model: give {ACCEPTED}")
    if kind == "etris":
        ckpt = read_checkpoint(checkpoint)
        config = saved_config(ckpt, checkpoint)
        if backbone is not None and backbone != config["backbone"]:
            raise UserError(f"{checkpoint!r} was trained with backbone {config['backbone']!r}, not {backbone!r}: "
                            f"drop --backbone or pass {config['backbone']!r}")
        if input_size is not None and input_size != config["input_size"]:
            raise UserError(f"--input-size {input_size}: {checkpoint} was trained at {config['input_size']} and runs "
                            f"at that size; drop --input-size")
        net = model_from_config(config, clip_weights)
        load_checkpoint(net, ckpt)
    else:
        if backbone is None:
            raise UserError(f"{checkpoint!r} is an authors' checkpoint without a config: pass --backbone (ViT-B/16, "
                            f"RN50 or RN101) and --clip-weights (the OpenAI archive it used)")
        net = build_model(backbone, clip_weights, input_size or 416, word_len)
        try:
            load_checkpoint(net, checkpoint)
        except UserError as e:
            raise UserError(f"{checkpoint!r} does not fit backbone {backbone!r} (wrong --backbone?): {e}") from None
    return net.to(device).eval()
