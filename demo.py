"""
Demo: ETRIS end to end on the built-in synthetic referring dataset, on the CPU, in minutes.

    python demo.py                 # the full demo (docs/demo.md numbers): train, evaluate, pictures, baselines
    python demo.py --quick         # a reduced run (tests/test_demo.py)

1. Frozen encoder. ETRIS (paper Sec. 3) adapts a frozen CLIP. With --clip-weights the demo uses that file.
   Without it no CLIP weights are assumed on disk (OpenAI's ViT-B/16 is 335 MB and far too slow for a CPU
   demo), so a small CLIP-shaped model is used (ViT: width 64, 3 blocks, patch 8 at 64 px; text: width 64,
   3 blocks; OpenAI's tokenizer and key names), randomly initialised, saved as a plain CLIP state dict and
   loaded exactly like OpenAI's weights.
2. ETRIS training on the synthetic train split through train.py's main (the real code path), in two DDP
   processes over gloo by default (--procs), as `torchrun --nproc_per_node 2 train.py` would run it (the demo prints
   that command). The learning rate is multiplied by --lr-decay at the --lr-drops fractions of the epochs (train.py's
   MultiStepLR).
3. Evaluation of the last checkpoint on the synthetic val scenes of --seed (every sentence) with evaluate.py's
   protocol. Then pictures of its best, median and worst sentences: overlays (prediction filled, ground truth
   outlined, with a legend) and explain.py's figures of where each word looks, and the statistic docs/demo.md
   quotes from the attention maps (colour_word_attention).
4. Language at work: the same model given another scene's sentence, and guesses that never read the sentence
   (an object picked by a fixed rule or at random, all objects, the whole image), scored with the same protocol.

Each kind of run has its own folder (exp/demo, exp/demo_quick, and _seedS for another seed); running the same kind
again replaces that folder's results and pictures, and says so.

Repeated in one environment (CPU type, torch build, --procs) a run is bit-identical; elsewhere the training
trajectory differs from the first step on, so another machine gives numbers within the spread over seeds that
docs/demo.md gives.
"""
import json
import math
import os
import shlex
import socket
import time

import cv2
import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

import evaluate
import explain
import train
from checkpoint import load_model
from clip_loader import random_clip_state_dict
from dataset import build_dataset, build_loader, letterbox_matrix
from errors import ArgumentParser, UserError, number, run_cli
from synthetic import synthetic_scene

# blocks per encoder of the tiny CLIP (the Bridger then taps after every block); see docs/demo.md
TINY_BLOCKS = 3


def tiny_clip_state_dict(input_size, seed=0):
    """The demo's CLIP-shaped encoder pair, randomly initialised as OpenAI initialises CLIP. Patch 8 rather than
    ViT-B/16's 16: at a 64 px input it keeps small objects a few tokens wide."""
    if input_size % 8:
        raise UserError(f"--input-size must be a multiple of the tiny ViT's patch size 8, got {input_size}")
    return random_clip_state_dict("tiny-ViT", seed, vision_layers=TINY_BLOCKS, transformer_layers=TINY_BLOCKS,
                                  vision_patch_size=8, vision_grid=input_size // 8)


# -----------------------------------------------------------------------------
# language at work

class OtherSentence(Dataset):
    """Test-mode samples whose sentences are those of the next scene: what the model does with the wrong text."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        other = self.dataset[(index + 1) % len(self.dataset)]
        sample['tokens'], sample['sentences'] = other['tokens'], other['sentences']
        return sample


def text_blind_baselines(num_samples, seed=0):
    """mIoU/oIoU (evaluate.summarize) of guesses that never read the sentence, over the same (ref, sentence)
    pairs as evaluate.py on the synthetic val split, at the original resolution. 'random object' is the exact
    expectation of picking one of the scene's objects uniformly: one draw's luck would move the best guess by
    points."""
    from evaluate import iou_stats, summarize
    centre = lambda o, h, w: (o['cx'] - w / 2) ** 2 + (o['cy'] - h / 2) ** 2
    rules = {
        'largest object': lambda objs, h, w: max(objs, key=lambda o: o['area'])['mask'],
        'smallest object': lambda objs, h, w: min(objs, key=lambda o: o['area'])['mask'],
        'most central object': lambda objs, h, w: min(objs, key=lambda o: centre(o, h, w))['mask'],
        'all objects': lambda objs, h, w: np.any([o['mask'] for o in objs], axis=0),
        'whole image': lambda objs, h, w: np.ones((h, w), bool),
    }
    stats = {name: ([], []) for name in rules}
    random_pick = ([], [], [])  # intersection, union and weight 1/n of each of a scene's n objects, per sentence
    for index in range(num_samples):
        scene = synthetic_scene(seed, 'val', index)
        objs, (h, w) = scene['objects'], scene['image'].shape[:2]
        gt = objs[scene['target']]['mask']
        for name, rule in rules.items():
            inter, union = iou_stats(rule(objs, h, w), gt)
            for _ in scene['sentences']:  # one guess per scene, scored once per sentence like the model
                stats[name][0].append(inter)
                stats[name][1].append(union)
        for o in objs:
            inter, union = iou_stats(o['mask'], gt)
            for _ in scene['sentences']:
                random_pick[0].append(inter)
                random_pick[1].append(union)
                random_pick[2].append(1 / len(objs))
    return {'random object': summarize(*random_pick), **{name: summarize(*s) for name, s in stats.items()}}


def _train_process(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(argv)


def run_training(argv, procs):
    """train.main(argv) in this process, or in `procs` DDP processes (gloo) on this machine."""
    if procs == 1:
        train.main(argv)
        return
    with socket.socket() as s:  # a free port for the process group
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_train_process, args=(procs, port, argv), nprocs=procs, join=True)


# -----------------------------------------------------------------------------

def cpu_seconds():
    """CPU seconds of this process and its finished children (the training processes); None off Unix."""
    try:
        import resource
    except ImportError:
        return None
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


QUICK = dict(steps=1000, train_samples=4000, val_samples=200, visualize=3)  # --quick, unless given


def parse_args(argv=None):
    p = ArgumentParser(description="ETRIS demo on synthetic data (CPU, minutes).")
    p.add_argument('--output', default=None,
                   help="folder for the CLIP file, checkpoints, pictures, results (default: exp/demo, exp/demo_quick "
                        "with --quick, and _seedS for a seed other than 0); a run replaces an earlier one there")
    p.add_argument('--clip-weights', default=None,
                   help="a ViT CLIP file (OpenAI archive or state dict) to use instead of the tiny one")
    p.add_argument('--input-size', type=number(int, 16), default=64, help="pixels (a multiple of 8 for the tiny ViT)")
    p.add_argument('--steps', type=number(int, 1), default=3200, help="ETRIS optimizer steps")
    p.add_argument('--batch-size', type=number(int, 1), default=16, help="global batch, split across --procs")
    p.add_argument('--lr', type=number(float, 0, low_open=True), default=1e-3, help="Adam's learning rate")
    p.add_argument('--lr-drops', type=number(float, 0, 1, low_open=True), nargs='+', default=[0.5, 0.75],
                   help="where the learning rate is multiplied by --lr-decay, as fractions of the epochs")
    p.add_argument('--lr-decay', type=number(float, 0, 1, low_open=True), default=0.4, help="see --lr-drops")
    p.add_argument('--dropout', type=number(float, 0, 1, high_open=True), default=0.0,
                   help="dropout in GA (the paper: 0.1). 0 here: the run is short, its scenes are fresh, and a "
                        "step is 14%% faster without it (docs/demo.md) (default: 0.0)")
    p.add_argument('--train-samples', type=number(int, 1), default=12800,
                   help="synthetic training refs (one epoch); made on the fly, so more of them cost nothing")
    p.add_argument('--val-samples', type=number(int, 1), default=500, help="synthetic val refs, every sentence")
    p.add_argument('--visualize', type=number(int, 0), default=8,
                   help="overlays to write: a mix of the best, median and worst val sentences")
    p.add_argument('--explain', type=number(int, 0), default=3,
                   help="explain.py figures to write, chosen the same way (3: the best, the median, the worst)")
    p.add_argument('--procs', type=number(int, 1), default=2,
                   help="training processes (DDP over gloo, like torchrun on CPU), each with one thread and its "
                        "share of the batch. 2 by default: measured on 2 cores, two processes train 1.3-1.5x faster "
                        "than one, while one process with two threads is no faster (its small kernels do not "
                        "parallelise)")
    p.add_argument('--seed', type=number(int, 0), default=0,
                   help="data, initialisation and training order (default: 0)")
    p.add_argument('--quick', action='store_true',
                   help="the reduced run of the tests: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                     for k, v in QUICK.items()) + " unless given")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if args.batch_size % args.procs:
        p.error(f"--batch-size {args.batch_size} is not divisible by --procs {args.procs}")
    if args.train_samples < args.batch_size:
        p.error(f"--train-samples {args.train_samples} is fewer than one batch (--batch-size {args.batch_size})")
    args.output = args.output or os.path.join('exp', 'demo' + '_quick' * args.quick +
                                              (f'_seed{args.seed}' if args.seed else ''))
    return args


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # callers (the tests) get their setting back


def frozen_clip(args, out):
    """1. The frozen CLIP: the file given, or the tiny random one, saved as a CLIP state dict."""
    if args.clip_weights:
        clip_path = os.path.abspath(args.clip_weights)
        print(f"[1/4] CLIP weights: {clip_path}")
        return clip_path
    clip_path = os.path.join(out, 'tiny_clip_random.pt')
    torch.save(tiny_clip_state_dict(args.input_size, args.seed), clip_path)
    print(f"[1/4] no CLIP weights given: using a small CLIP-shaped backbone (ViT width 64, {TINY_BLOCKS} blocks, "
          f"patch 8; text width 64, {TINY_BLOCKS} blocks), randomly initialised and frozen -> {clip_path}")
    return clip_path


def train_command(argv, procs):
    """The command line that trains as run_training(argv, procs) does: one thread per process, as the demo."""
    launcher = ['torchrun', '--standalone', '--nproc_per_node', str(procs)] if procs > 1 else ['python']
    return 'OMP_NUM_THREADS=1 ' + shlex.join(launcher + ['train.py', *argv])


def train_etris(args, run_dir, clip_path):
    """2. ETRIS training through train.py; one epoch is train_samples // batch_size steps. Returns its history."""
    epochs = math.ceil(args.steps / (args.train_samples // args.batch_size))
    milestones = sorted({m for m in (round(f * epochs) for f in args.lr_drops) if 0 < m < epochs}) or [epochs]
    argv = ['--data', 'synthetic', '--backbone', 'tiny-ViT', '--clip-weights', clip_path,
            '--input-size', str(args.input_size), '--epochs', str(epochs), '--max-steps', str(args.steps),
            '--milestones', *map(str, milestones), '--lr-decay', str(args.lr_decay),
            '--batch-size', str(args.batch_size),
            '--lr', str(args.lr), '--dropout', str(args.dropout), '--train-samples', str(args.train_samples),
            '--val-samples', str(args.val_samples), '--workers', '0', '--device', 'cpu',
            '--seed', str(args.seed), '--output', run_dir, '--log-every', '25']
    print(f"[2/4] training ETRIS: {args.steps} steps of {args.batch_size} ({epochs} epochs of {args.train_samples} "
          f"synthetic refs) in {args.procs} process(es), frozen CLIP from {clip_path}; the same as\n      "
          f"{train_command(argv, args.procs)}", flush=True)
    if os.path.isfile(os.path.join(run_dir, 'metrics.jsonl')):
        os.remove(os.path.join(run_dir, 'metrics.jsonl'))
    run_training(argv, args.procs)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def evaluate_val(net, args):
    """3. The evaluation protocol on every sentence of this seed's val scenes; 4. the model given another scene's
    sentence, and the guesses that never read the sentence."""
    print(f"[3/4] evaluating on the synthetic val split ({args.val_samples} refs, every sentence)", flush=True)
    val = build_dataset('synthetic', 'val', input_size=net.config.input_size, word_len=net.config.word_len,
                        mode='test', num_samples=args.val_samples, seed=args.seed)
    metrics = evaluate.evaluate(net, build_loader(val, 16), torch.device('cpu'))
    print("[4/4] text-blind baselines and the model given another scene's sentence", flush=True)
    wrong = evaluate.evaluate(net, build_loader(OtherSentence(val), 16), torch.device('cpu'))
    per_sentence = metrics.pop('per_sample')  # [(ref index, sentence index, intersection, union)]
    del metrics['bad_samples'], wrong['per_sample'], wrong['bad_samples']
    return val, metrics, per_sentence, wrong, text_blind_baselines(args.val_samples, args.seed)


# -----------------------------------------------------------------------------
# pictures: overlays and explain.py figures of the best, median and worst sentences

def pick_sentences(per_sentence, n):
    """n of the evaluated (ref, sentence) pairs: the best n//3, the n//3 around the median and the worst n//3 by IoU
    (what n % 3 leaves goes to the best, then the worst). Returns [(label, ref index, sentence index, IoU)],
    labels best1 (the best), ..., median1, ..., worst1 (the worst); ties go to the lower ref index."""
    iou = lambda r: r[2] / (r[3] + 1e-6)  # as evaluate.summarize
    ranked = sorted(per_sentence, key=lambda r: (-iou(r), r[0], r[1]))  # best first
    k, extra = divmod(n, 3)
    middle = max(0, len(ranked) // 2 - k // 2)
    worst_first = sorted(per_sentence, key=lambda r: (iou(r), r[0], r[1]))
    picked, seen = [], set()
    for label, rows in (('best', ranked[:k + (extra > 0)]), ('median', ranked[middle:middle + k]),
                        ('worst', worst_first[:k + (extra > 1)])):
        for j, r in enumerate(rows):
            if (r[0], r[1]) not in seen:
                seen.add((r[0], r[1]))
                picked.append((f"{label}{j + 1}", r[0], r[1], iou(r)))
    return picked


def clear_pictures(*folders):
    """Remove the PNG and .npz files an earlier run left in the demo's picture folders."""
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith(('.png', '.npz')):
                    os.remove(os.path.join(folder, name))


@torch.no_grad()
def write_pictures(net, val, per_sentence, args, vis_dir, fig_dir):
    """Overlays (evaluate.write_overlay) and explain.py figures of the best, median and worst val sentences.
    Returns {'overlays': [...], 'explain': [...]}: (label, ref index, sentence index, IoU) of each."""
    overlays, figures = pick_sentences(per_sentence, args.visualize), pick_sentences(per_sentence, args.explain)
    for label, index, s, iou in overlays:
        sample = val[index]
        logits = net(sample['image'][None], sample['tokens'][s:s + 1])
        pred = evaluate.masks_to_original(logits, [sample['inverse']], [sample['orig_size']],
                                          net.config.input_size)[0]
        inter, union = evaluate.iou_stats(pred, sample['orig_mask'])  # the drawn mask's (the batch's, on this CPU)
        evaluate.write_overlay(vis_dir, index, s, sample['image'], sample['inverse'], sample['orig_size'], pred,
                               sample['orig_mask'], sample['sentences'][s], inter / (union + 1e-6), f"{label}_")
    for label, index, s, iou in figures:
        scene = val.scene(index)
        expl = explain.explain(net, scene['image'], scene['sentences'][s])
        explain.save(expl, os.path.join(fig_dir, f"{label}_{index:06d}_{s}"), tile=72)
    return {'overlays': overlays, 'explain': figures}


# -----------------------------------------------------------------------------
# what the trained attention does with colour words

def region_coverage(mask, input_size, grid):
    """mask [H, W] of the original image -> [grid, grid]: the fraction of each cell of the model's input grid it
    covers, letterboxed as the model sees the image."""
    mat = letterbox_matrix(mask.shape[0], mask.shape[1], input_size)[0]
    warped = cv2.warpAffine(mask.astype(np.float32), mat, (input_size, input_size), flags=cv2.INTER_LINEAR)
    return cv2.resize(warped, (grid, grid), interpolation=cv2.INTER_AREA)


def colour_regions(scene, colour, input_size, grid):
    """Coverage maps [grid, grid] of the objects of `colour`, the other objects and the background."""
    cover = {o_id: region_coverage(o['mask'], input_size, grid) for o_id, o in enumerate(scene['objects'])}
    same = sum((c for i, c in cover.items() if scene['objects'][i]['colour'] == colour), np.zeros((grid, grid)))
    other = sum((c for i, c in cover.items() if scene['objects'][i]['colour'] != colour), np.zeros((grid, grid)))
    image = region_coverage(np.ones(scene['image'].shape[:2]), input_size, grid)
    return {'same_colour': same, 'other_objects': other, 'background': np.clip(image - same - other, 0, None)}


def region_means(heat, regions):
    """The mean of heat [g, g] over each region, weighting each cell by the fraction the region covers
    (None for an empty region)."""
    return {name: (float((heat * cover).sum() / cover.sum()) if cover.sum() > 1e-9 else None)
            for name, cover in regions.items()}


@torch.no_grad()
def colour_word_attention(net, dataset, batch_size=16):
    """Where the trained attention puts the colour words, over every sentence of `dataset` (synthetic, test mode)
    that names a colour ("the red circle"; a colour word is one that names the colour of an object of the scene).
    ga_layerK: the mean weight the pixels give the colour word (GA cross-attention, heads averaged) at objects of
    that colour, at other objects and at the background, and 'uniform', the weight of a pixel that reads every
    token of the sentence alike. bridger_stageI: the share of the colour word's image-reading attention (fusion_t)
    on objects of that colour ('mass_same_colour'), and their share of the input ('area_same_colour'). Each a mean
    over the colour words; 'words': how many."""
    values, words = {}, 0
    net.eval()
    for first in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        counts = [len(s['tokens']) for s in samples]
        with explain.capture_attention(net) as maps:
            net(torch.stack([s['image'] for s in samples]), torch.cat([s['tokens'] for s in samples]),
                image_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)))
        row = 0
        for sample in samples:
            scene = dataset.scene(sample['index'])
            colours = {o['colour'] for o in scene['objects']}
            for tokens in sample['tokens']:
                groups = explain.word_groups(tokens)
                for word in (g for g in groups if g[0] in colours):
                    words += 1
                    for site, w in maps.items():
                        add_site_values(values, site, w[row].float().numpy(), word, int((tokens > 0).sum()), scene,
                                        net.config.input_size)
                row += 1
    means = {site: {k: float(np.mean(v)) for k, v in d.items()} for site, d in values.items()}
    return {'words': words, **means}


def add_site_values(values, site, weights, word, n_tokens, scene, input_size):
    """colour_word_attention's measures at one site for one colour word, appended to values[site][measure]."""
    if site.endswith('image_reads_words'):
        return
    heat = explain.per_word_maps(weights, [word], site.endswith('words_read_image'))[0]  # [g, g]
    regions = colour_regions(scene, word[0], input_size, heat.shape[0])
    name = site.split('_')[0] + '_' + site.split('_')[1]  # bridger_stage3, ga_layer1
    d = values.setdefault(name, {})
    if site.startswith('ga_'):
        for region, mean in region_means(heat, regions).items():
            if mean is not None:
                d.setdefault(region, []).append(mean)
        d.setdefault('uniform', []).append((word[1][1] - word[1][0]) / n_tokens)  # a pixel reading all tokens alike
    else:  # the word's map sums to 1 over the grid
        d.setdefault('mass_same_colour', []).append(float((heat * regions['same_colour']).sum()))
        d.setdefault('area_same_colour', []).append(float(regions['same_colour'].sum() / heat.size))


# -----------------------------------------------------------------------------

def run(args):
    out = os.path.abspath(args.output)
    run_dir = os.path.join(out, 'etris')
    vis_dir, fig_dir = os.path.join(run_dir, 'vis_synthetic_val'), os.path.join(out, 'explain')
    if os.path.isfile(os.path.join(out, 'demo_results.json')):
        print(f"{out} holds an earlier demo run: this run replaces its results, checkpoints and pictures")
    clear_pictures(vis_dir, fig_dir)
    os.makedirs(out, exist_ok=True)
    times, t0, load_at_start = {}, time.time(), os.getloadavg()
    clip_path = frozen_clip(args, out)
    history = train_etris(args, run_dir, clip_path)
    times['train'] = time.time() - t0
    net = load_model(os.path.join(run_dir, 'last.pth'), device='cpu')
    val, metrics, per_sentence, wrong, blind = evaluate_val(net, args)
    times['evaluate'] = time.time() - t0 - times['train']
    pictures = write_pictures(net, val, per_sentence, args, vis_dir, fig_dir)
    attention = colour_word_attention(net, val)
    best_blind = max(blind, key=lambda k: blind[k]['mIoU'])
    times['total'] = time.time() - t0
    results = {
        'clip_weights': clip_path, 'args': vars(args),
        'train_loss_per_epoch': [r['train_loss'] for r in history],
        'val_sentence0_mIoU_per_epoch': [r['val_mIoU'] for r in history],
        'val': metrics, 'other_sentence': wrong, 'text_blind': blind,
        'best_text_blind': {'rule': best_blind, **blind[best_blind]}, 'pictures': pictures,
        'colour_word_attention': attention, 'seconds': times,
        # how busy the machine was: CPU seconds of this process and the training processes, load at start and end
        'cpu_seconds': cpu_seconds(), 'load_average': [load_at_start, os.getloadavg()],
        'val_per_sentence': per_sentence,
    }
    with open(os.path.join(out, 'demo_results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print_summary(results, vis_dir, fig_dir, os.path.join(out, 'demo_results.json'))
    return results


def print_summary(results, vis_dir, fig_dir, results_path):
    metrics, wrong, blind = results['val'], results['other_sentence'], results['text_blind']
    print("\n=== ETRIS demo (synthetic val split, every sentence; IoU in %) ===")
    print(f"train loss per epoch:           {' '.join(f'{x:.4f}' for x in results['train_loss_per_epoch'])}")
    print(f"ETRIS:                          mIoU {metrics['mIoU']:6.2f}  oIoU {metrics['oIoU']:6.2f}  "
          f"Prec@0.5 {metrics['Prec@0.5']:6.2f}  (n={metrics['n']})")
    print(f"ETRIS, another scene's text:    mIoU {wrong['mIoU']:6.2f}  oIoU {wrong['oIoU']:6.2f}")
    for name, m in blind.items():
        print(f"text-blind, {name + ':':<21} mIoU {m['mIoU']:6.2f}  oIoU {m['oIoU']:6.2f}")
    print(f"best text-blind guess:          {results['best_text_blind']['rule']} "
          f"(mIoU {results['best_text_blind']['mIoU']:.2f})")
    attention = results['colour_word_attention']
    ga = attention.get(f"ga_layer{max(int(k[8:]) for k in attention if k.startswith('ga_layer'))}", {})
    if ga:
        print(f"colour words ({attention['words']}), last GA layer: pixels of objects of that colour give the word "
              f"weight {ga['same_colour']:.3f}, other objects {ga['other_objects']:.3f}, "
              f"background {ga['background']:.3f}")
    for kind, rows in results['pictures'].items():
        print(f"{kind}: " + ", ".join(f"{label} (IoU {100 * iou:.1f})" for label, _, _, iou in rows))
    print(f"overlays: {vis_dir}   explain figures: {fig_dir}   results: {results_path}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results['seconds'].items()))


if __name__ == '__main__':
    run_cli(main)
