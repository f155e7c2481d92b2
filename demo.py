"""
Demo: ETRIS end to end on the built-in synthetic referring dataset, on the CPU, in minutes.

    python demo.py                 # the full demo (docs/demo.md numbers): train, evaluate, overlays, baselines
    python demo.py --quick         # a reduced run (tests/test_demo.py)

1. Frozen encoder. ETRIS (paper Sec. 3) adapts a frozen CLIP. With --clip-weights the demo uses that file.
   Without it no CLIP weights are assumed on disk (OpenAI's ViT-B/16 is 335 MB and far too slow for a CPU
   demo), so a small CLIP-shaped model is used (ViT: width 64, 3 blocks, patch 8 at 64 px; text: width 64,
   3 blocks; OpenAI's tokenizer and key names), randomly initialised, saved as a plain CLIP state dict and
   loaded exactly like OpenAI's weights.
2. ETRIS training on the synthetic train split through train.py's main (the real code path), in two DDP
   processes over gloo by default (--procs), as `torchrun --nproc_per_node 2 train.py` would run it. The learning
   rate is multiplied by --lr-decay at the --lr-drops fractions of the epochs (train.py's MultiStepLR).
3. Evaluation of the last checkpoint on the synthetic val scenes of --seed (every sentence) with evaluate.py's
   protocol, which also writes a few prediction overlays (red: prediction, green outline: ground truth).
4. Language at work: the same model given another scene's sentence, and guesses that never read the sentence
   (an object picked by a fixed rule or at random, all objects, the whole image), scored with the same protocol.

Repeated in one environment (CPU type, torch build, --procs) a run is bit-identical; elsewhere the training
trajectory differs from the first step on, so another machine gives numbers within the spread over seeds that
docs/demo.md gives.
"""
import argparse
import json
import math
import os
import socket
import time

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

import evaluate
import train
from checkpoint import load_model
from clip_loader import random_clip_state_dict
from dataset import build_dataset, build_loader
from synthetic import synthetic_scene
from errors import UserError, run_cli

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ETRIS demo on synthetic data (CPU, minutes).")
    p.add_argument('--output', default='exp/demo', help="folder for the CLIP file, checkpoints, overlays, results")
    p.add_argument('--clip-weights', default=None,
                   help="a ViT CLIP file (OpenAI archive or state dict) to use instead of the tiny one")
    p.add_argument('--input-size', type=int, default=64)
    p.add_argument('--steps', type=int, default=3200, help="ETRIS optimizer steps")
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--lr-drops', type=float, nargs='+', default=[0.5, 0.75],
                   help="where the learning rate is multiplied by --lr-decay, as fractions of the epochs")
    p.add_argument('--lr-decay', type=float, default=0.4)
    p.add_argument('--dropout', type=float, default=0.0,
                   help="dropout in GA (the paper: 0.1). 0 here: the run is short, its scenes are fresh, and a "
                        "step is 14%% faster without it (docs/demo.md)")
    p.add_argument('--train-samples', type=int, default=12800,
                   help="synthetic training refs (one epoch); made on the fly, so more of them cost nothing")
    p.add_argument('--val-samples', type=int, default=500)
    p.add_argument('--visualize', type=int, default=8, help="overlay PNGs to write")
    p.add_argument('--procs', type=int, default=2,
                   help="training processes (DDP over gloo, like torchrun on CPU), each with one thread and its "
                        "share of the batch. 2 by default: measured on 2 cores, two processes train 1.3-1.5x faster "
                        "than one, while one process with two threads is no faster (its small kernels do not "
                        "parallelise)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quick', action='store_true', help="reduced run for the tests (fewer steps and samples)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_samples, args.val_samples = 1000, 4000, 200
        args.visualize = min(args.visualize, 2)
    if args.procs < 1:
        p.error(f"--procs must be at least 1, got {args.procs}")
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


def train_etris(args, run_dir, clip_path):
    """2. ETRIS training through train.py; one epoch is train_samples // batch_size steps. Returns its history."""
    epochs = math.ceil(args.steps / (args.train_samples // args.batch_size))
    milestones = sorted({m for m in (round(f * epochs) for f in args.lr_drops) if 0 < m < epochs}) or [epochs]
    print(f"[2/4] training ETRIS: {args.steps} steps of {args.batch_size} ({epochs} epochs of {args.train_samples} "
          f"synthetic refs) in {args.procs} process(es), frozen CLIP from {clip_path}", flush=True)
    if os.path.isfile(os.path.join(run_dir, 'metrics.jsonl')):
        os.remove(os.path.join(run_dir, 'metrics.jsonl'))
    run_training(['--data', 'synthetic', '--backbone', 'tiny-ViT', '--clip-weights', clip_path,
                  '--input-size', str(args.input_size), '--epochs', str(epochs), '--max-steps', str(args.steps),
                  '--milestones', *map(str, milestones), '--lr-decay', str(args.lr_decay),
                  '--batch-size', str(args.batch_size),
                  '--lr', str(args.lr), '--dropout', str(args.dropout), '--train-samples', str(args.train_samples),
                  '--val-samples', str(args.val_samples), '--workers', '0', '--device', 'cpu',
                  '--seed', str(args.seed), '--output', run_dir, '--log-every', '25'], args.procs)
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def evaluate_val(net, args, vis_dir):
    """3. The evaluation protocol on every sentence of this seed's val scenes, with a few overlays; 4. the model
    given another scene's sentence, and the guesses that never read the sentence."""
    print(f"[3/4] evaluating on the synthetic val split ({args.val_samples} refs, every sentence)", flush=True)
    val = build_dataset('synthetic', 'val', input_size=net.config.input_size, word_len=net.config.word_len,
                        mode='test', num_samples=args.val_samples, seed=args.seed)
    metrics = evaluate.evaluate(net, build_loader(val, 16), torch.device('cpu'), visualize=args.visualize,
                                vis_dir=vis_dir)
    print("[4/4] text-blind baselines and the model given another scene's sentence", flush=True)
    wrong = evaluate.evaluate(net, build_loader(OtherSentence(val), 16), torch.device('cpu'))
    per_sentence = metrics.pop('per_sample')  # [(ref index, sentence index, intersection, union)]
    del metrics['bad_samples'], wrong['per_sample'], wrong['bad_samples']
    return metrics, per_sentence, wrong, text_blind_baselines(args.val_samples, args.seed)


def run(args):
    out = os.path.abspath(args.output)
    run_dir = os.path.join(out, 'etris')
    os.makedirs(out, exist_ok=True)
    times, t0, load_at_start = {}, time.time(), os.getloadavg()
    clip_path = frozen_clip(args, out)
    history = train_etris(args, run_dir, clip_path)
    times['train'] = time.time() - t0
    net = load_model(os.path.join(run_dir, 'last.pth'), device='cpu')
    metrics, per_sentence, wrong, blind = evaluate_val(net, args, os.path.join(run_dir, 'vis_synthetic_val'))
    best_blind = max(blind, key=lambda k: blind[k]['mIoU'])
    times['total'] = time.time() - t0
    results = {
        'clip_weights': clip_path, 'args': vars(args),
        'train_loss_per_epoch': [r['train_loss'] for r in history],
        'val_sentence0_mIoU_per_epoch': [r['val_mIoU'] for r in history],
        'val': metrics, 'other_sentence': wrong, 'text_blind': blind,
        'best_text_blind': {'rule': best_blind, **blind[best_blind]}, 'seconds': times,
        # how busy the machine was: CPU seconds of this process and the training processes, load at start and end
        'cpu_seconds': cpu_seconds(), 'load_average': [load_at_start, os.getloadavg()],
        'val_per_sentence': per_sentence,
    }
    with open(os.path.join(out, 'demo_results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print_summary(results, os.path.join(run_dir, 'vis_synthetic_val'), os.path.join(out, 'demo_results.json'))
    return results


def print_summary(results, vis_dir, results_path):
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
    print(f"overlays: {vis_dir}   results: {results_path}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results['seconds'].items()))


if __name__ == '__main__':
    run_cli(main)
