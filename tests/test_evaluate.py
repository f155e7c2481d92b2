"""Tests of evaluate.py: the metric functions against hand-computed values, masks_to_original against an
independent OpenCV computation, batch-size invariance of the whole evaluation, checkpoint-kind errors."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from checkpoint import load_model, save_checkpoint
from clip_loader import random_clip_state_dict
from dataset import build_dataset, build_loader
from errors import UserError
from evaluate import evaluate, iou_stats, main, masks_to_original, summarize, train_metric
from model import build_model


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_iou_stats_counts_pixels():
    pred = box(10, 10, 0, 2, 0, 2)           # 4 px
    gt = box(10, 10, 0, 2, 1, 3) * 255       # 4 px, 0/255 like the mask PNGs, 2 px shared
    assert iou_stats(pred, gt) == (2, 6)
    assert iou_stats(np.zeros((4, 4)), np.zeros((4, 4))) == (0, 0)
    with pytest.raises(ValueError, match="shape"):
        iou_stats(np.zeros((4, 4)), np.zeros((4, 5)))


def test_summarize_hand_computed_miou_differs_from_oiou():
    # sample A: inter 2 / union 6 -> IoU 1/3; sample B: a perfect 100-px hit -> IoU ~1
    m = summarize([2, 100], [6, 100])
    assert m["n"] == 2
    assert m["mIoU"] == pytest.approx(100 * (2 / (6 + 1e-6) + 100 / (100 + 1e-6)) / 2, abs=1e-9)  # 66.67
    assert m["oIoU"] == pytest.approx(100 * 102 / 106, abs=1e-9)                       # 96.23
    assert m["Prec@0.5"] == m["Prec@0.9"] == 50.0
    # strict '>' as the authors, and their 1e-6: IoU exactly 0.5 (1/2) does not count, 0/0 scores 0
    m = summarize([1, 0, 3], [2, 0, 4])
    assert m["Prec@0.5"] == pytest.approx(100 / 3)   # only 3/4 > 0.5
    assert m["Prec@0.7"] == pytest.approx(100 / 3)
    assert m["Prec@0.8"] == 0.0
    assert m["mIoU"] == pytest.approx(100 * (1 / (2 + 1e-6) + 0 + 3 / (4 + 1e-6)) / 3)
    assert m["oIoU"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(ValueError, match="no samples"):
        summarize([], [])


def test_prec_counts_iou_of_exactly_seven_and_nine_tenths_as_the_authors():
    # gt: 27,450 px; pred: 19,215 of them -> IoU 19215/27450 = 7/10 exactly (before the 1e-6 epsilon).
    # The authors' float32 thresholds (0.7 -> 0.699999988) count it for Prec@0.7; a float64 0.7 would not.
    gt = np.zeros((150, 183), bool)
    gt.flat[:27450] = True
    seven, nine = gt.copy(), gt.copy()
    seven.flat[19215:27450] = False
    nine.flat[24705:27450] = False                      # 24705/27450 = 9/10
    counts = [iou_stats(seven, gt), iou_stats(nine, gt)]
    assert counts == [(19215, 27450), (24705, 27450)]
    m = summarize(*zip(*counts))
    assert m["Prec@0.7"] == 100.0 and m["Prec@0.8"] == 50.0 and m["Prec@0.9"] == 50.0
    ious = np.array([19215, 24705]) / (27450 + 1e-6)
    assert not ious[0] > 0.7 and not ious[1] > 0.9  # float64 thresholds would have counted neither


def test_train_metric_matches_hand_computed_iou():
    logits = torch.full((2, 1, 2, 2), -5.0)
    logits[0, 0, 0, :] = 5.0                              # sample 0 predicts the top row
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :] = 1.0                               # its mask is the top row at 1/2 resolution
    mask[1, 0, 0, 0] = 0.4                                # soft edge values count as foreground (> 0)
    iou_sum, prec = train_metric(logits, mask)
    assert iou_sum.item() == pytest.approx(2 / (2 + 1e-6) + 0.0)  # sample 1: pred empty, mask 1 px
    assert prec.item() == 1.0


def letterbox_forward(h, w, size):
    """Independent of dataset.py: scale to fit, centred."""
    s = min(size / h, size / w)
    return np.array([[s, 0, (size - w * s) / 2], [0, s, (size - h * s) / 2]], np.float64)


def test_masks_to_original_matches_independent_cv2():
    size, (h, w) = 64, (30, 50)
    fwd = letterbox_forward(h, w, size)
    inv = cv2.invertAffineTransform(fwd)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, size, size, generator=g) * 3  # full size: no upsampling, tests the warp alone
    (mask,) = masks_to_original(logits, [inv], [(h, w)], size)
    prob = torch.sigmoid(logits)[0, 0].numpy()
    ref = cv2.warpAffine(prob, fwd, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderValue=0) > 0.35
    assert mask.shape == (h, w) and mask.dtype == bool
    assert (mask == ref).all()
    assert 0.2 < mask.mean() < 0.8  # a real mixture, not trivially all one value

    # 1/4-resolution logits: left half of the letterboxed map positive, right half negative. The image is
    # 50 wide, so it fills the letterbox horizontally: the original's left half must come back True.
    small = torch.full((1, 1, size // 4, size // 4), -8.0)
    small[..., : size // 8] = 8.0
    (mask,) = masks_to_original(small, [inv], [(h, w)], size)
    assert mask[:, :20].all() and not mask[:, 30:].any()
    # threshold and interpolation are honoured: everything at 0.5 probability
    flat = torch.zeros(1, 1, 16, 16)
    assert masks_to_original(flat, [inv], [(h, w)], size, threshold=0.4)[0].all()
    assert not masks_to_original(flat, [inv], [(h, w)], size, threshold=0.6)[0].any()
    assert masks_to_original(flat, [inv], [(h, w)], size, 0.4, "nearest")[0].all()
    with pytest.raises(ValueError, match="interpolation"):
        masks_to_original(flat, [inv], [(h, w)], size, interpolation="area")


# ----------------------------------------------------------------------------- with a (random) tiny model

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = build_model("tiny-ViT", input_size=64, word_len=17).eval()
    ds = build_dataset("synthetic", "test", input_size=64, num_samples=5)
    return net, ds


def save_ours(net, path):
    save_checkpoint(str(path), net)
    return str(path)


def test_shards_cover_every_sample_once(tiny):
    _, ds = tiny
    seen = [int(i) for r in range(3) for b in build_loader(ds, 2, shard=(r, 3)) for i in b["index"]]
    assert sorted(seen) == list(range(len(ds)))  # 5 samples over 3 ranks: 2 + 2 + 1, no padding


def test_evaluation_is_identical_for_batch_size_1_and_8(tiny):
    net, ds = tiny
    one = evaluate(net, build_loader(ds, 1), "cpu")
    eight = evaluate(net, build_loader(ds, 8), "cpu")
    n_sent = sum(len(ds[i]["sentences"]) for i in range(len(ds)))
    assert one["n"] == n_sent > len(ds)                      # every sentence of every ref
    assert one["per_sample"] == eight["per_sample"]          # same pixels counted, sample by sample
    assert {k: v for k, v in one.items() if k != "per_sample"} == \
           {k: v for k, v in eight.items() if k != "per_sample"}
    assert sum(r[2] for r in one["per_sample"]) > 0          # non-trivial predictions
    assert summarize([r[2] for r in one["per_sample"]], [r[3] for r in one["per_sample"]])["mIoU"] == one["mIoU"]


def test_cli_writes_json_and_overlays_next_to_checkpoint(tiny, tmp_path):
    net, ds = tiny
    ck = save_ours(net, tmp_path / "best.pth")
    metrics = main(["--data", "synthetic", "--split", "test", "--checkpoint", ck, "--num-samples", "5",
                    "--workers", "0", "--batch-size", "3", "--threshold", "0.3", "--visualize", "2", "--device", "cpu"])
    record = json.load(open(tmp_path / "eval_synthetic_test.json"))
    assert record["threshold"] == 0.3 and record["interpolation"] == "bicubic"
    direct = evaluate(net, build_loader(ds, 4), "cpu", threshold=0.3)
    for k in ("mIoU", "oIoU", "Prec@0.5", "n"):
        assert record[k] == metrics[k] == direct[k]
    pngs = sorted(os.listdir(tmp_path / "vis_synthetic_test"))
    assert len(pngs) == 2
    h, w = ds[0]["orig_size"]
    vis = cv2.imread(str(tmp_path / "vis_synthetic_test" / pngs[0]))
    assert vis.shape == (round(h * 384 / w) + 52, 384, 3) if w < 384 else (h + 52, w, 3)  # + caption and legend


def test_load_model_ours_authors_and_wrong_files(tiny, tmp_path):
    net, ds = tiny
    x, tok = ds[0]["image"][None], ds[0]["tokens"][:1]
    ours = load_model(save_ours(net, tmp_path / "ours.pth"))
    assert torch.equal(ours(x, tok), net(x, tok))
    # the authors' format: DDP 'module.' keys under 'state_dict', no config, their MultiStepLR state beside it
    authors = str(tmp_path / "authors.pth")
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[35], gamma=0.1)
    torch.save({"epoch": 50, "scheduler": sched.state_dict(),
                "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, authors)
    theirs = load_model(authors, backbone="tiny-ViT", input_size=64, word_len=17)
    assert torch.equal(theirs(x, tok), net(x, tok))
    with pytest.raises(UserError, match="pass --backbone"):
        load_model(authors)
    with pytest.raises(UserError, match="does not fit backbone 'tiny-RN'"):
        load_model(authors, backbone="tiny-RN", input_size=64)
    with pytest.raises(UserError, match="trained with backbone 'tiny-ViT'"):
        load_model(str(tmp_path / "ours.pth"), backbone="tiny-RN")
    with pytest.raises(UserError, match=r"--input-size 96: .*ours.pth was trained at 64 and runs at that size"):
        load_model(str(tmp_path / "ours.pth"), input_size=96)
    clip = str(tmp_path / "clip.pt")
    torch.save(random_clip_state_dict("tiny-ViT"), clip)
    with pytest.raises(UserError, match="--clip-weights"):
        load_model(clip)
    with pytest.raises(UserError, match="nothing.pth"):
        load_model(str(tmp_path / "nothing.pth"))


def test_no_checkpoint_yet_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no checkpoint at exp/refcoco/ViT-B-16/best.pth: train one first \(python "
                                        r"train.py --data refcoco ...\), or pass --checkpoint PATH; an authors' "
                                        r"release also needs --backbone and --clip-weights"):
        main(["--split", "testA", "--device", "cpu"])
