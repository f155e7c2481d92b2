"""
Where the frozen CLIP weights of ETRIS come from: OpenAI's released archives (RN50, RN101, ViT-B/16), found by name
in a local cache, downloaded there on first use and SHA-256 checked, or any CLIP weights file given by path; and
small randomly initialised CLIPs of the real architectures, for tests, the demo and benchmarks. The architecture
itself is clip.py.
"""
import hashlib
import os
import tempfile
import urllib.request
import warnings
import zipfile

import torch

from clip import CLIP, check_image_size, clip_config
from errors import UserError

# OpenAI's release; the SHA-256 of each file is the path component before its name.
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
_ALIASES = {"ViT-B-16": "ViT-B/16"}

# CLIP constructor arguments of OpenAI's models, and of two small ones (width 64, 6 blocks) for tests
ARCHITECTURES = {
    "ViT-B/16": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16, vision_grid=14),
    "RN50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None, vision_grid=7),
    "RN101": dict(embed_dim=512, vision_layers=(3, 4, 23, 3), vision_width=64, vision_patch_size=None,
                  vision_grid=7),
    "tiny-ViT": dict(embed_dim=64, vision_layers=6, vision_width=64, vision_patch_size=16, vision_grid=14,
                     transformer_width=64, transformer_heads=1, transformer_layers=6),
    # layer1..4 channels 64/128/256/512, an attnpool of 8 heads, and embed_dim 128 != the text width, like RN50
    "tiny-RN": dict(embed_dim=128, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None,
                    vision_grid=7, transformer_width=64, transformer_heads=1, transformer_layers=6),
}
_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
BACKBONES = tuple(ARCHITECTURES)


def check_backbone(name, input_size=None, clip_weights=None):
    """A backbone name, and an --input-size (if given) against the patch size (ViT) or stride (ResNet) of its
    OpenAI architecture; CLIP weights given by file carry their own patch size, checked when the model is built."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}: valid backbones are {', '.join(BACKBONES)}")
    if input_size is None or clip_weights is not None:
        return
    try:
        check_image_size(input_size, ARCHITECTURES[name]["vision_patch_size"])
    except ValueError as e:
        raise UserError(f"--input-size {input_size} does not fit backbone {name}: {e}; 416 is the paper's") from None


def random_clip_state_dict(architecture, seed=0, **changes):
    """A CLIP state dict with OpenAI's key names and the shapes of `architecture` (a key of ARCHITECTURES, with
    `changes` to its constructor arguments), randomly initialised as OpenAI initialises CLIP."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown CLIP architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**{**_TEXT, **ARCHITECTURES[architecture], **changes})
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.attnpool.connect.")}


def backbone_state_dict(backbone, clip_weights=None):
    """The CLIP weights of an ETRIS backbone: the file clip_weights if given, else OpenAI's release by name (a
    random small CLIP for 'tiny-*')."""
    if clip_weights is not None:
        return load_clip_state_dict(os.fspath(clip_weights))
    if backbone.startswith("tiny-"):
        return random_clip_state_dict(backbone)
    return load_clip_state_dict(backbone)


# ----------------------------------------------------------------------------------------------
# loading OpenAI weights

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, target, sha):
    """Stream url into a temp file next to target, check its SHA-256, then rename."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha:
            raise ValueError(f"downloaded file has SHA-256 {h.hexdigest()}, expected {sha}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_openai_weights(name, cache_dir=None):
    """The path of OpenAI's weights file for `name` in the cache, downloaded there first if it is not."""
    url = _MODELS[_ALIASES.get(name, name)]
    sha = url.split("/")[-2]
    root = cache_dir or os.environ.get("ETRIS_CLIP_CACHE") or os.path.expanduser("~/.cache/clip")
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        got = _sha256(target)
        if got != sha:
            raise UserError(
                f"{target} has SHA-256 {got}, expected {sha} for CLIP {name} (partial or wrong "
                f"file): delete it and rerun to download again, or download {url} to {target}")
        return target
    try:
        _download(url, target, sha)
    except Exception as e:
        raise UserError(
            f"CLIP {name} weights are not in {root} and could not be downloaded ({e}). "
            f"Download {url} and save it as {target} (SHA-256 {sha}), or set ETRIS_CLIP_CACHE "
            f"to the folder holding it; --clip-weights PATH uses a weights file directly and "
            f"skips this lookup.") from e
    return target


def is_torchscript_archive(path):
    """OpenAI's release format: a zip archive holding TorchScript's constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _read_state_dict(path):
    if is_torchscript_archive(path):  # OpenAI's release, with fp16 weights
        with warnings.catch_warnings():
            # only torch.jit.load reads TorchScript, which torch deprecates with a warning on every call (a
            # DeprecationWarning, hidden by default, up to 2.13; a FutureWarning, shown, from 2.14)
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is (deprecated|not supported)")
            try:
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception as e:
                raise UserError(f"{path} is a TorchScript archive that torch.jit.load cannot read ({e}): download "
                                f"the file again") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is neither a TorchScript archive (like OpenAI's CLIP .pt "
                             f"files) nor a torch.save'd state dict: {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and "text_projection" not in sd and isinstance(sd.get(key), dict):
                sd = sd[key]
    try:
        clip_config(sd)
    except ValueError as e:
        raise UserError(f"{path} does not hold CLIP weights: {e}") from e
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def load_clip_state_dict(name_or_path, cache_dir=None):
    """fp32 CLIP state dict from a name ('ViT-B/16' or 'ViT-B-16', 'RN50', 'RN101': OpenAI's
    file, found in cache_dir, default $ETRIS_CLIP_CACHE or ~/.cache/clip, or downloaded there
    and SHA-256 checked) or from a path (OpenAI TorchScript archive, or a torch.save'd dict,
    possibly nested under 'state_dict' or 'model')."""
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in _MODELS:
        return _read_state_dict(fetch_openai_weights(name, cache_dir))
    if os.path.isfile(name_or_path):
        return _read_state_dict(name_or_path)
    valid = ", ".join(list(_MODELS) + list(_ALIASES))
    if os.sep in name_or_path or os.path.splitext(name_or_path)[1]:
        raise UserError(f"CLIP weights file {name_or_path} not found "
                                f"(it is not a CLIP name either; names: {valid})")
    raise UserError(f"unknown CLIP model {name_or_path!r}: valid names are {valid}, "
                     f"or give the path of a weights file")
