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

The helpers here (masks_to_original, iou_stats, summarize, evaluate) are also what train.py's per-epoch
validation and predict.py use.
"""
import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from checkpoint import ACCEPTED, load_model
from clip_loader import BACKBONES, check_backbone
from dataset import CLIP_MEAN, CLIP_STD, DATASETS, WORD_LEN, build_dataset, build_loader, default_workers
from errors import ArgumentParser, UserError, number, run_cli

# Prec@X as the authors count it: their thresholds are torch.arange(0.5, 1.0, 0.1), float32 values compared with
# float64 IoUs, so 0.7 is 0.699999988 there and an IoU of exactly 7/10 counts for Prec@0.7
PREC_THRESHOLDS = {f"Prec@{t}": float(np.float32(t)) for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
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


def train_metric(logits, mask, threshold=0.35):
    """The authors' trainMetricGPU, on the device: the IoU of sigmoid(logits) >= threshold against the mask resized
    (nearest) to the logits' size. Returns (sum of IoUs, number with IoU > 0.5) as tensors, with no host sync."""
    target = F.interpolate(mask, size=logits.shape[-2:], mode="nearest").flatten(1) > 0
    pred = torch.sigmoid(logits.detach().float()).flatten(1) >= threshold
    ious = (pred & target).sum(1) / ((pred | target).sum(1) + 1e-6)
    return ious.sum(), (ious > 0.5).sum().float()


def summarize(inters, unions, weights=None):
    """Per-sentence pixel counts -> dict of percentages: mIoU, oIoU, Prec@0.5..0.9, and n. weights (optional): one
    per entry, for the expected scores of a guess drawn at random (demo.py); n is then their sum."""
    inters, unions = np.asarray(inters, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    if inters.size == 0:
        raise ValueError("summarize: no samples to summarize (empty split or shard?)")
    w = np.ones_like(inters) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = lambda x: (w * x).sum() / w.sum()  # all weights 1: exactly x.mean()
    ious = inters / (unions + 1e-6)  # the authors' epsilon: an empty prediction of an empty mask scores 0
    out = {"mIoU": 100.0 * mean(ious), "oIoU": 100.0 * (w * inters).sum() / max((w * unions).sum(), 1.0)}
    for name, t in PREC_THRESHOLDS.items():
        out[name] = 100.0 * float(mean(ious > t))  # strict '>', as engine.py
    out["n"] = int(round(w.sum()))
    return {k: (float(v) if k != "n" else v) for k, v in out.items()}


def format_table(metrics):
    keys = ["mIoU", "oIoU", *PREC_THRESHOLDS]
    head = " | ".join(f"{k:>8}" for k in keys) + " |        n"
    row = " | ".join(f"{metrics[k]:8.2f}" for k in keys) + f" | {metrics['n']:8d}"
    return head + "\n" + row


# -----------------------------------------------------------------------------
# batched, sharded evaluation loop

def _sentence_tokens(batch):
    """A collated batch's tokens as a list of [n_sent, L] tensors (val: one sentence, test: all)."""
    tokens = batch["tokens"]
    if torch.is_tensor(tokens):
        return [t.reshape(-1, t.shape[-1]) for t in tokens]  # val mode: [B, L] -> B x [1, L]
    return list(tokens)


@torch.no_grad()
def evaluate(net, loader, device, threshold=0.35, interpolation="bicubic", visualize=0, vis_dir=None,
             progress=False):
    """Segment every (ref, sentence) pair of `loader`'s samples; returns summarize(...) over all processes plus
    'per_sample': sorted [(index, sentence, inter, union)] and 'bad_samples': the samples that failed to load
    (skip_bad datasets), which count in no metric. Under torchrun every process calls it with its own shard
    (dataset.build_loader's shard); the result is the same on all of them."""
    was_training = net.training
    net.eval()
    records, bad, n_vis = [], [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        bad += batch.pop("bad_samples", [])
        if "image" not in batch:  # every sample of the batch failed to load
            continue
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
    records = sorted(r for part in distributed.gather(records) for r in part)
    bad = [b for part in distributed.gather(bad) for b in part]
    if len({(r[0], r[1]) for r in records}) != len(records):
        raise RuntimeError("evaluate: a (ref, sentence) pair was counted twice; check the loader's sharding")
    net.train(was_training)
    out = summarize([r[2] for r in records], [r[3] for r in records])
    out["per_sample"], out["bad_samples"] = records, bad
    return out


def write_overlay(vis_dir, index, sentence_idx, image, inverse, orig_size, pred, gt, sentence, iou, prefix=""):
    """One PNG, <prefix><index>_<sentence>.png: the (un-letterboxed) image with the prediction filled and the
    ground truth outlined (overlay), the IoU and sentence above it, and a legend."""
    h, w = int(orig_size[0]), int(orig_size[1])
    rgb = image.permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    rgb = np.clip(rgb * 255.0, 0, 255).astype(np.float32)
    rgb = cv2.warpAffine(rgb, np.asarray(inverse, dtype=np.float64), (w, h), flags=cv2.INTER_CUBIC)
    bgr = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    colours = overlay_colours(bgr, pred, gt)
    canvas = add_caption(overlay(bgr, pred, gt, colours), f"IoU {100 * iou:.1f}: {sentence}", legend=colours)
    os.makedirs(vis_dir, exist_ok=True)
    cv2.imwrite(os.path.join(vis_dir, f"{prefix}{index:06d}_{sentence_idx}.png"), canvas)


# overlay colours (BGR): magenta, cyan, yellow, lime, blue, red. The prediction and the ground truth each take the
# one farthest from the pixels they cover, so that both stay visible on an object of any colour
OVERLAY_PALETTE = ((255, 0, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0), (255, 64, 0), (0, 0, 255))


def overlay_colours(bgr, pred, gt=None):
    """The colours overlay() draws with, as a legend for add_caption: {'prediction': (bgr, 'fill'), 'ground truth':
    (bgr, 'outline')}. Each is the palette colour farthest (10th percentile of the RGB distances) from the pixels
    under the prediction / along the ground truth's outline; the two always differ."""
    def farthest(region, exclude=None):
        pixels = bgr[region].reshape(-1, 3).astype(np.float32)[::max(1, int(region.sum()) // 4096)]
        choices = [c for c in OVERLAY_PALETTE if c != exclude]
        if not len(pixels):
            return choices[0]
        return max(choices, key=lambda c: np.percentile(np.linalg.norm(pixels - np.float32(c), axis=1), 10))
    fill = farthest(np.asarray(pred, dtype=bool))
    legend = {"prediction": (fill, "fill")}
    if gt is not None:
        gt = (np.asarray(gt) > 0).astype(np.uint8)
        ring = cv2.dilate(gt, np.ones((5, 5), np.uint8)) != cv2.erode(gt, np.ones((5, 5), np.uint8))
        legend["ground truth"] = (farthest(ring, exclude=fill), "outline")
    return legend


def overlay(bgr, pred, gt=None, colours=None):
    """bgr uint8 [H,W,3]; pred bool [H,W] filled half-transparent, with a solid edge; gt (optional) outlined 2 px.
    Colours from overlay_colours (default: computed here): visible on any object colour (a red prediction on a red
    object is not red)."""
    colours = colours or overlay_colours(bgr, pred, gt)
    pred = np.asarray(pred, dtype=bool)
    fill = np.array(colours["prediction"][0], np.float32)
    out = bgr.astype(np.float32)
    out[pred] = 0.5 * out[pred] + 0.5 * fill
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(pred.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, colours["prediction"][0], 1)
    if gt is not None:
        contours, _ = cv2.findContours((np.asarray(gt) > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colours["ground truth"][0], 2)
    return out


def add_caption(bgr, text, min_width=384, legend=None):
    """A black band above the image with `text` (cv2 fonts are ASCII only) and, if given, a legend line
    (overlay_colours: a filled or outlined swatch per entry); small images are enlarged first (nearest) so the
    caption fits and the mask stays visible."""
    if bgr.shape[1] < min_width:
        f = min_width / bgr.shape[1]
        bgr = cv2.resize(bgr, (min_width, max(1, round(bgr.shape[0] * f))), interpolation=cv2.INTER_NEAREST)
    text = text.encode("ascii", "replace").decode()
    band = np.zeros((28 + (24 if legend else 0), bgr.shape[1], 3), np.uint8)
    cv2.putText(band, text, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    x = 4
    for label, (colour, style) in (legend or {}).items():
        cv2.rectangle(band, (x, 32), (x + 22, 46), colour, -1 if style == "fill" else 2)
        cv2.putText(band, f"{label} ({style})", (x + 28, 45), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        x += 40 + cv2.getTextSize(f"{label} ({style})", cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]
    return np.concatenate([band, bgr], axis=0)


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate ETRIS with the authors' protocol.")
    p.add_argument("--data", default="refcoco", choices=sorted(DATASETS), help="dataset (see README: Data)")
    p.add_argument("--split", default="val", help="a split of --data: " + "; ".join(
        f"{name} {', '.join(d['splits'])}" for name, d in sorted(DATASETS.items())))
    p.add_argument("--data-root", default="./datasets", help="folder holding images/ and the annotations")
    p.add_argument("--checkpoint", default=None,
                   help="default: exp/<data>/<backbone>/best.pth (backbone default ViT-B/16)")
    p.add_argument("--backbone", default=None, help=f"required for the authors' checkpoints: one of "
                                                    f"{', '.join(BACKBONES)} (ours carry it)")
    p.add_argument("--clip-weights", default=None, help="CLIP archive/state dict (default: by name)")
    p.add_argument("--input-size", type=number(int, 1), default=None,
                   help="authors' checkpoints only, default 416 (ours carry theirs)")
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="refs per forward per process")
    p.add_argument("--workers", type=number(int, 0), default=default_workers(),
                   help="data loader workers per process (default: the CPUs this process may use, shared by the "
                        "node's processes, at most 4: %(default)s here)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images/masks, count them, report")
    p.add_argument("--threshold", type=number(float, 0, 1, low_open=True, high_open=True), default=0.35,
                   help="on the sigmoid of the logits")
    p.add_argument("--interpolation", default="bicubic", choices=sorted(CV2_INTERPOLATION),
                   help="of the upsampling and the inverse letterbox warp")
    p.add_argument("--num-samples", type=number(int, 1), default=None,
                   help="only the first N refs (quick runs; default: all)")
    p.add_argument("--visualize", type=number(int, 0), default=0, metavar="N", help="write N overlay PNGs (rank 0)")
    p.add_argument("--output", default=None, help="JSON path (default: eval_<data>_<split>.json next to it)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    if args.split not in DATASETS[args.data]["splits"]:
        p.error(f"--split {args.split!r} is not a split of {args.data}: {', '.join(DATASETS[args.data]['splits'])}")
    if args.backbone is not None:
        check_backbone(args.backbone, args.input_size, args.clip_weights)
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file; give {ACCEPTED}")
    return args


def main(argv=None):
    args = parse_args(argv)
    proc = distributed.setup(args.device)
    checkpoint = args.checkpoint or os.path.join("exp", args.data, (args.backbone or "ViT-B/16").replace("/", "-"),
                                                 "best.pth")
    if not os.path.isfile(checkpoint):  # the default path: nothing trained there yet
        raise UserError(f"no checkpoint at {checkpoint}: train one first (python train.py --data {args.data} ...), "
                        f"or pass --checkpoint PATH; an authors' release also needs --backbone and --clip-weights")
    net = load_model(checkpoint, args.backbone, args.clip_weights, args.input_size, WORD_LEN[args.data], proc.device)
    dataset = build_dataset(args.data, args.split, root=args.data_root, input_size=net.config.input_size,
                            word_len=net.config.word_len, mode="test", skip_bad=args.skip_bad,
                            num_samples=args.num_samples, verbose=proc.main)
    loader = build_loader(dataset, args.batch_size, args.workers, shard=(proc.rank, proc.world),
                          pin_memory=proc.device.type == "cuda")
    vis_dir = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"vis_{args.data}_{args.split}")
    metrics = evaluate(net, loader, proc.device, args.threshold, args.interpolation,
                       visualize=args.visualize if proc.main else 0, vis_dir=vis_dir, progress=proc.main)
    metrics.pop("per_sample")
    bad = dataset.bad_samples + metrics.pop("bad_samples")
    if proc.main:
        print(f"{args.data} {args.split}  ({checkpoint})")
        print(format_table(metrics))
        if bad:
            print(f"--skip-bad left out {len(bad)} bad sample(s), first: ref {bad[0]['ref_id']}: {bad[0]['error']}")
        out = args.output or os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                          f"eval_{args.data}_{args.split}.json")
        record = {"data": args.data, "split": args.split, "checkpoint": os.path.abspath(checkpoint),
                  "threshold": args.threshold, "interpolation": args.interpolation,
                  "input_size": net.config.input_size, "word_len": net.config.word_len, **metrics,
                  "bad_samples": bad}
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {out}")
    distributed.teardown()
    return metrics


if __name__ == "__main__":
    run_cli(main)
