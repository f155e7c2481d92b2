"""
Evaluation of ETRIS on a referring-segmentation split, with the authors' test protocol (their test.py and
engine.inference, inherited from CRIS): every sentence of every ref is segmented; the 1/4-resolution logits
go through a sigmoid, bicubic upsampling (align_corners=True) to the input size, the inverse letterbox warp
back to the original image size (cv2.warpAffine, cubic, border 0) and a 0.35 threshold; the IoU is taken
against the original-resolution mask. Reported: mIoU (mean over sentences: what the paper calls "IoU"),
overall IoU (sum of intersections / sum of unions) and Prec@0.5..0.9 (fraction of sentences with IoU > t).

    python evaluate.py --data refcoco --split testA                     # our best.pth, config inside
    python evaluate.py --checkpoint refcoco_r101.pth --backbone RN101 --clip-weights pretrain/RN101.pt
    torchrun --nproc_per_node 4 evaluate.py --split val                 # sharded, no sample counted twice

The helpers here (masks_to_original, iou_stats, summarize, evaluate, load_model) are also what train.py's
per-epoch validation and predict.py use.
"""
import argparse
import json
import os
import zipfile

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset import CLIP_MEAN, CLIP_STD, DATASETS, WORD_LEN, build_dataset, collate
from model import build_model, load_checkpoint, read_checkpoint

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# the interpolation option drives both the upsampling (torch) and the inverse warp (cv2)
CV2_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


# -----------------------------------------------------------------------------
# protocol and metrics

def masks_to_original(logits, inverse, orig_size, input_size, threshold=0.35, interpolation="bicubic"):
    """logits [B,1,h,w] -> list of B bool masks [H_i, W_i] at each image's original resolution."""
    if interpolation not in CV2_INTERPOLATION:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(CV2_INTERPOLATION)}")
    probs = torch.sigmoid(logits.detach().float())
    if probs.shape[-2:] != (input_size, input_size):
        corners = {} if interpolation == "nearest" else {"align_corners": True}
        probs = F.interpolate(probs, size=(input_size, input_size), mode=interpolation, **corners)
    probs = probs[:, 0].cpu().numpy()  # [B, S, S] float32
    masks = []
    for prob, inv, (h, w) in zip(probs, inverse, orig_size):
        # `inv` maps input coords to original coords; passed as the forward matrix like the authors do,
        # so OpenCV inverts it internally and samples the letterboxed map at letterbox(x, y)
        prob = cv2.warpAffine(prob, np.asarray(inv, dtype=np.float64), (int(w), int(h)),
                              flags=CV2_INTERPOLATION[interpolation], borderValue=0.0)
        masks.append(prob > threshold)
    return masks


def iou_stats(pred, gt):
    """pred, gt: [H, W] masks (bool or {0,1} / {0,255}) -> (intersection, union) pixel counts."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def summarize(inters, unions):
    """Per-sentence pixel counts -> dict of percentages: mIoU, oIoU, Prec@0.5..0.9, and n."""
    inters, unions = np.asarray(inters, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    if inters.size == 0:
        raise ValueError("summarize: no samples to summarize (empty split or shard?)")
    ious = inters / (unions + 1e-6)  # the authors' epsilon: an empty prediction of an empty mask scores 0
    out = {"mIoU": 100.0 * ious.mean(), "oIoU": 100.0 * inters.sum() / max(unions.sum(), 1.0)}
    for t in PREC_THRESHOLDS:
        out[f"Prec@{t}"] = 100.0 * float((ious > t).mean())  # strict '>', as engine.py
    out["n"] = int(inters.size)
    return {k: (float(v) if k != "n" else v) for k, v in out.items()}


def format_table(metrics):
    keys = ["mIoU", "oIoU"] + [f"Prec@{t}" for t in PREC_THRESHOLDS]
    head = " | ".join(f"{k:>8}" for k in keys) + " |        n"
    row = " | ".join(f"{metrics[k]:8.2f}" for k in keys) + f" | {metrics['n']:8d}"
    return head + "\n" + row


# -----------------------------------------------------------------------------
# batched, sharded evaluation loop

def shard_loader(dataset, batch_size, workers, collate_fn, rank=None, world=None):
    """Loader over this rank's share (indices rank, rank+world, ...): no padding, so no duplicates.
    rank/world default to the torch.distributed ones (0/1 without a process group)."""
    if rank is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    subset = Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))  # keeps the global RNG untouched


def _sentence_tokens(batch):
    """A collated batch's tokens as a list of [n_sent, L] tensors (val: one sentence, test: all)."""
    tokens = batch["tokens"]
    if torch.is_tensor(tokens):
        return [t.reshape(-1, t.shape[-1]) for t in tokens]  # val mode: [B, L] -> B x [1, L]
    return list(tokens)


@torch.no_grad()
def evaluate(net, loader, device, threshold=0.35, interpolation="bicubic", visualize=0, vis_dir=None,
             progress=False):
    """Segment every (ref, sentence) pair of `loader`'s samples; returns summarize(...) over all ranks plus
    'per_sample': sorted [(index, sentence, inter, union)]. Under torch.distributed every rank must call it
    with its own shard (see shard_loader); the result is the same on all ranks."""
    was_training = net.training
    net.eval()
    records, n_vis = [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        tokens = _sentence_tokens(batch)
        counts = [t.shape[0] for t in tokens]
        # one row per (ref, sentence); the visual stream before the first Bridger stage is text-independent,
        # so it runs once per image (image_index), then per sentence
        images = batch["image"].to(device)
        image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
        logits = net(images, torch.cat(tokens).to(device), image_index=image_index)  # [N_pairs, 1, S/4, S/4]
        rows = [(i, s) for i, n in enumerate(counts) for s in range(n)]
        masks = masks_to_original(logits, [batch["inverse"][i] for i, _ in rows],
                                  [batch["orig_size"][i] for i, _ in rows], images.shape[-1],
                                  threshold, interpolation)
        for (i, s), pred in zip(rows, masks):
            inter, union = iou_stats(pred, batch["orig_mask"][i])
            index = int(batch["index"][i])
            records.append((index, s, inter, union))
            if n_vis < visualize:
                sentence = batch["sentences"][i][s] if "sentences" in batch else ""
                write_overlay(vis_dir, index, s, batch["image"][i], batch["inverse"][i],
                              batch["orig_size"][i], pred, batch["orig_mask"][i], sentence,
                              inter / (union + 1e-6))
                n_vis += 1
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort()
    if len({(r[0], r[1]) for r in records}) != len(records):
        raise RuntimeError("evaluate: a (ref, sentence) pair was counted twice; check the loader's sharding")
    net.train(was_training)
    out = summarize([r[2] for r in records], [r[3] for r in records])
    out["per_sample"] = records
    return out


def write_overlay(vis_dir, index, sentence_idx, image, inverse, orig_size, pred, gt, sentence, iou):
    """One PNG: the (un-letterboxed) image with prediction in red, ground-truth outline in green, text."""
    h, w = int(orig_size[0]), int(orig_size[1])
    rgb = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    rgb = np.clip(rgb * 255.0, 0, 255).astype(np.float32)
    rgb = cv2.warpAffine(rgb, np.asarray(inverse, dtype=np.float64), (w, h), flags=cv2.INTER_CUBIC)
    canvas = overlay(cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR), pred, gt)
    caption = f"IoU {100 * iou:.1f}: {sentence}"
    canvas = add_caption(canvas, caption)
    os.makedirs(vis_dir, exist_ok=True)
    cv2.imwrite(os.path.join(vis_dir, f"{index:06d}_{sentence_idx}.png"), canvas)


def overlay(bgr, pred, gt=None):
    """bgr uint8 [H,W,3]; pred bool [H,W] tinted red; gt (optional) drawn as a green outline."""
    out = bgr.astype(np.float32)
    pred = np.asarray(pred, dtype=bool)
    out[pred] = 0.5 * out[pred] + 0.5 * np.array([0, 0, 255], np.float32)
    out = out.astype(np.uint8)
    if gt is not None:
        contours, _ = cv2.findContours((np.asarray(gt) > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 2)
    return out


def add_caption(bgr, text, min_width=384):
    """A black band above the image with `text` (cv2 fonts are ASCII only); small images are enlarged first
    (nearest) so the caption fits and the mask stays visible."""
    if bgr.shape[1] < min_width:
        f = min_width / bgr.shape[1]
        bgr = cv2.resize(bgr, (min_width, max(1, round(bgr.shape[0] * f))), interpolation=cv2.INTER_NEAREST)
    text = text.encode("ascii", "replace").decode()
    band = np.zeros((28, bgr.shape[1], 3), np.uint8)
    cv2.putText(band, text, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([band, bgr], axis=0)


# -----------------------------------------------------------------------------
# checkpoints: ours (config inside) and the authors' released ones

def weights_file_kind(path):
    """'clip' (OpenAI archive or CLIP state dict), 'etris' (ours), 'etris-authors' (released), or 'unknown'.
    Used to turn a file passed to the wrong option into one clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                return "clip"  # TorchScript archive: OpenAI's release format
    try:
        obj = read_checkpoint(path, mmap=is_zip)
    except RuntimeError:
        return "unknown"
    if not isinstance(obj, dict):
        return "unknown"
    if "config" in obj and "model" in obj:
        return "etris"
    sd = obj.get("state_dict", obj)
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd] if isinstance(sd, dict) else []
    if any(k.startswith(("bridger.", "decoder.", "neck.")) for k in keys):
        return "etris-authors"
    if any(k.startswith("visual.") for k in keys) and "token_embedding.weight" in keys:
        return "clip"
    return "unknown"


def load_model(checkpoint, backbone=None, clip_weights=None, input_size=416, word_len=17, device="cpu"):
    """Rebuild ETRIS from a checkpoint. Ours carry their build_model config; the authors' carry none, so
    `backbone` (and `clip_weights` unless resolvable by name) must be given. Returns the net in eval mode."""
    kind = weights_file_kind(checkpoint)
    if kind == "clip":
        raise ValueError(f"{checkpoint!r} is a CLIP weights file, not an ETRIS checkpoint: pass it as "
                         f"--clip-weights and give the trained ETRIS checkpoint as --checkpoint")
    if kind == "unknown":
        raise ValueError(f"{checkpoint!r} is neither one of our ETRIS checkpoints nor an authors' release")
    if kind == "etris":
        ck = read_checkpoint(checkpoint)
        cfg = dict(ck["config"]["net"])
        if backbone is not None and backbone != cfg["backbone"]:
            raise ValueError(f"{checkpoint!r} was trained with backbone {cfg['backbone']!r}, not "
                             f"{backbone!r}: drop --backbone or pass {cfg['backbone']!r}")
        if clip_weights is not None:
            cfg["clip_weights"] = clip_weights
        net = build_model(**cfg)
        load_checkpoint(net, ck["model"])
    else:
        if backbone is None:
            raise ValueError(f"{checkpoint!r} is an authors' checkpoint without a config: pass --backbone "
                             f"(ViT-B/16, RN50 or RN101) and --clip-weights (the OpenAI archive it used)")
        net = build_model(backbone=backbone, clip_weights=clip_weights, input_size=input_size,
                          word_len=word_len)
        try:
            load_checkpoint(net, checkpoint)
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(f"{checkpoint!r} does not fit backbone {backbone!r} (wrong --backbone?): "
                               f"{e}") from e
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# command line

def sanitize(backbone):
    return backbone.replace("/", "-")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate ETRIS with the authors' protocol.")
    p.add_argument("--data", default="refcoco")
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", default="./datasets")
    p.add_argument("--checkpoint", default=None,
                   help="default: exp/<data>/<backbone>/best.pth (backbone default ViT-B/16)")
    p.add_argument("--backbone", default=None, help="required for the authors' checkpoints")
    p.add_argument("--clip-weights", default=None, help="CLIP archive/state dict (default: by name)")
    p.add_argument("--input-size", type=int, default=416, help="authors' checkpoints only (ours: in config)")
    p.add_argument("--batch-size", type=int, default=8, help="refs per forward per process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--interpolation", default="bicubic", choices=sorted(CV2_INTERPOLATION))
    p.add_argument("--num-samples", type=int, default=None, help="synthetic split size (quick runs)")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="write N overlay PNGs (rank 0)")
    p.add_argument("--output", default=None, help="JSON path (default: eval_<data>_<split>.json next to it)")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    args = p.parse_args(argv)

    if args.data not in DATASETS:
        raise ValueError(f"--data {args.data!r} is not one of {sorted(DATASETS)}")
    checkpoint = args.checkpoint or os.path.join("exp", args.data, sanitize(args.backbone or "ViT-B/16"),
                                                 "best.pth")
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                          else "cpu"))
    rank = dist.get_rank() if distributed else 0

    net = load_model(checkpoint, args.backbone, args.clip_weights, args.input_size, WORD_LEN[args.data], device)
    dataset = build_dataset(args.data, args.split, root=args.data_root, input_size=net.config["input_size"],
                            word_len=net.config["word_len"], mode="test", num_samples=args.num_samples)
    loader = shard_loader(dataset, args.batch_size, args.workers, collate)
    vis_dir = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"vis_{args.data}_{args.split}")
    metrics = evaluate(net, loader, device, args.threshold, args.interpolation,
                       visualize=args.visualize if rank == 0 else 0, vis_dir=vis_dir, progress=rank == 0)
    metrics.pop("per_sample")
    if rank == 0:
        print(f"{args.data} {args.split}  ({checkpoint})")
        print(format_table(metrics))
        out = args.output or os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                          f"eval_{args.data}_{args.split}.json")
        record = {"data": args.data, "split": args.split, "checkpoint": os.path.abspath(checkpoint),
                  "threshold": args.threshold, "interpolation": args.interpolation,
                  "input_size": net.config["input_size"], "word_len": net.config["word_len"], **metrics}
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {out}")
    if distributed:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
