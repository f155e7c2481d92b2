"""The demo (demo.py). The reduced run (--quick: 1000 steps in 2 DDP processes) goes through the real train/evaluate
code and checks that the training loss falls, that ETRIS beats the best text-blind guess, and that it reads the
sentence (another scene's sentence scores far lower). It runs seed 0; ETRIS_DEMO_SEEDS="0 1 2 3 4" runs those seeds
instead (docs/demo.md gives what they measured). ETRIS_DEMO_FULL=1 also runs the full demo and checks docs/demo.md's
claim on the same seeds."""
import json
import os
import shlex

import cv2
import numpy as np
import pytest
import torch

import demo
import evaluate
from dataset import CLIP_MEAN, CLIP_STD
from errors import UserError
from synthetic import _COLOURS, synthetic_scene

SEEDS = [int(s) for s in os.environ.get('ETRIS_DEMO_SEEDS', '0').split()]


@pytest.mark.parametrize('seed', [0, 4])
def test_text_blind_guesses_stay_low(seed):
    # the synthetic val split needs the sentence: no guess made without it gets near the demo's claim
    blind = demo.text_blind_baselines(500, seed)
    assert set(blind) == {'random object', 'largest object', 'smallest object', 'most central object',
                          'all objects', 'whole image'}
    assert all(m['n'] > 1000 for m in blind.values())  # every sentence of the 500 refs
    assert max(m['mIoU'] for m in blind.values()) <= 34.0, blind
    assert blind['whole image']['mIoU'] < 6.0


def test_random_object_guess_is_its_exact_expectation():
    # objects never overlap, so a uniformly picked object scores IoU 1 (up to the epsilon) with probability 1/n, else 0
    scenes = [synthetic_scene(3, 'val', i) for i in range(60)]
    expected = [1 / len(sc['objects']) for sc in scenes for _ in sc['sentences']]
    random_object = demo.text_blind_baselines(60, 3)['random object']
    assert random_object['n'] == len(expected)
    assert random_object['mIoU'] == pytest.approx(100 * np.mean(expected), abs=1e-3)
    assert random_object['Prec@0.5'] == pytest.approx(random_object['mIoU'], abs=1e-3)
    # oIoU: the expected intersection (the target's area / n) over the expected union, summed over sentences
    inter = [sc['objects'][sc['target']]['area'] / len(sc['objects']) for sc in scenes for _ in sc['sentences']]
    union = [np.mean([o['area'] + sc['objects'][sc['target']]['area'] * (i != sc['target'])
                      for i, o in enumerate(sc['objects'])]) for sc in scenes for _ in sc['sentences']]
    assert random_object['oIoU'] == pytest.approx(100 * sum(inter) / sum(union), rel=1e-9)


@pytest.mark.parametrize('seed', SEEDS)
def test_quick_demo_trains_evaluates_and_writes_its_pictures(tmp_path, seed, monkeypatch, capsys):
    commands = []

    def recorded(argv, procs):  # the training the demo runs, as it is run
        commands.append(list(argv))
        return run_training(argv, procs)
    run_training = demo.run_training
    monkeypatch.setattr(demo, 'run_training', recorded)
    results = demo.main(['--quick', '--seed', str(seed), '--output', str(tmp_path)])
    losses = results['train_loss_per_epoch']
    assert len(losses) == 4 and losses[3] < losses[2] < losses[1] < losses[0] and losses[3] < 0.6 * losses[0], losses
    assert results['val']['n'] > 400  # every sentence of the 200 val refs
    assert results['val']['mIoU'] > results['best_text_blind']['mIoU'] + 5.0, (results['val'], results['text_blind'])
    assert results['val']['mIoU'] > results['other_sentence']['mIoU'] + 20.0, (results['val'], results['other_sentence'])
    # the printed command is the training that ran
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if 'train.py' in line]
    assert printed == [demo.train_command(commands[0], 2)]
    assert shlex.split(printed[0])[:6] == ['OMP_NUM_THREADS=1', 'torchrun', '--standalone', '--nproc_per_node', '2',
                                           'train.py'] and shlex.split(printed[0])[6:] == commands[0]
    # the frozen CLIP is a plain CLIP state dict on disk, loaded like OpenAI's weights
    from clip_loader import load_clip_state_dict
    sd = load_clip_state_dict(str(tmp_path / 'tiny_clip_random.pt'))
    assert sd['visual.conv1.weight'].shape == (64, 3, 8, 8)
    assert torch.equal(sd['visual.conv1.weight'], demo.tiny_clip_state_dict(64, seed)['visual.conv1.weight'])
    with open(tmp_path / 'demo_results.json') as f:
        saved = json.load(f)
    assert saved['val']['mIoU'] == pytest.approx(results['val']['mIoU'])
    assert saved['best_text_blind']['mIoU'] == max(m['mIoU'] for m in saved['text_blind'].values())
    assert len(saved['val_per_sentence']) == results['val']['n']
    # pictures: the best, the median and the worst sentence, by the evaluation's IoUs
    ious = sorted(((i / (u + 1e-6), index, s) for index, s, i, u in saved['val_per_sentence']),
                  key=lambda t: (-t[0], t[1], t[2]))
    chosen = {'best1': ious[0], 'median1': ious[len(ious) // 2], 'worst1': min(ious, key=lambda t: (t[0], t[1], t[2]))}
    expected = sorted(f"{label}_{index:06d}_{s}.png" for label, (_, index, s) in chosen.items())
    assert sorted(os.listdir(tmp_path / 'etris' / 'vis_synthetic_val')) == expected
    assert sorted(os.listdir(tmp_path / 'explain')) == sorted(expected + [n[:-4] + '.npz' for n in expected])
    # the colour-word statistic of docs/demo.md: the same code on the same model gives the same numbers
    from checkpoint import load_model
    from dataset import build_dataset
    net = load_model(str(tmp_path / 'etris' / 'last.pth'), device='cpu')
    val = build_dataset('synthetic', 'val', input_size=64, word_len=17, mode='test', num_samples=200, seed=seed)
    attention = demo.colour_word_attention(net, val)  # with this process's threads: equal to float rounding
    assert set(attention) == set(saved['colour_word_attention'])
    for site, measures in saved['colour_word_attention'].items():
        assert attention[site] == (measures if site == 'words' else pytest.approx(measures, rel=1e-6)), site
    colour_words = sum(w in {o['colour'] for o in val.scene(i)['objects']}
                       for i in range(len(val)) for sentence in val.scene(i)['sentences'] for w in sentence.split())
    assert attention['words'] == colour_words > 100
    for k in (1, 2, 3):
        assert set(attention[f'ga_layer{k}']) == {'same_colour', 'other_objects', 'background', 'uniform'}
        assert all(0 <= v <= 1 for v in attention[f'ga_layer{k}'].values())
        assert 0 < attention[f'bridger_stage{k}']['area_same_colour'] < 1
        assert 0 <= attention[f'bridger_stage{k}']['mass_same_colour'] <= 1


def test_pictures_are_a_mix_of_best_median_and_worst():
    per_sentence = [(i, 0, 10 * i, 100) for i in range(11)]  # ref i has IoU i/10
    picked = demo.pick_sentences(per_sentence, 8)
    assert [(label, index) for label, index, _, _ in picked] == [
        ('best1', 10), ('best2', 9), ('best3', 8), ('median1', 6), ('median2', 5), ('worst1', 0), ('worst2', 1),
        ('worst3', 2)]
    assert [label for label, *_ in demo.pick_sentences(per_sentence, 3)] == ['best1', 'median1', 'worst1']
    assert demo.pick_sentences(per_sentence, 3)[1][1] == 5 and demo.pick_sentences(per_sentence, 0) == []
    assert len(demo.pick_sentences(per_sentence[:2], 8)) == 2  # no sentence twice


def test_colour_regions_and_their_means():
    scene = synthetic_scene(0, 'val', 5)
    colour = scene['objects'][0]['colour']
    regions = demo.colour_regions(scene, colour, 64, 8)
    image = demo.region_coverage(np.ones(scene['image'].shape[:2]), 64, 8)
    total = regions['same_colour'] + regions['other_objects'] + regions['background']
    np.testing.assert_allclose(total, image, atol=1e-5)  # the regions share out the image, letterbox excluded
    areas = sum(o['area'] for o in scene['objects'] if o['colour'] == colour) / scene['image'][..., 0].size
    assert regions['same_colour'].sum() / image.sum() == pytest.approx(areas, rel=0.05)
    heat = (regions['same_colour'] > 0.5).astype(float)  # attention on the cells mostly of that colour
    means = demo.region_means(heat, regions)
    assert means['same_colour'] > 0.6 and means['background'] < 0.1
    assert means['same_colour'] == pytest.approx(np.average(heat, weights=regions['same_colour']))
    assert demo.region_means(np.ones((8, 8)), regions)['other_objects'] in (None, pytest.approx(1.0))


@pytest.mark.parametrize('colour', sorted(_COLOURS))
def test_overlay_colours_stay_visible_on_every_object_colour(colour, tmp_path):
    r, g, b = _COLOURS[colour]
    bgr = np.full((90, 120, 3), (90, 100, 80), np.uint8)
    cv2.circle(bgr, (60, 45), 28, (b, g, r), -1)
    gt = np.zeros((90, 120), np.uint8)
    cv2.circle(gt, (60, 45), 28, 1, -1)
    pred = gt.astype(bool)
    drawn = evaluate.overlay(bgr, pred, gt).astype(float)
    inside = cv2.erode(gt, np.ones((9, 9), np.uint8)) > 0  # away from the outlines
    assert np.linalg.norm(drawn[inside] - (b, g, r), axis=1).min() > 60  # the prediction differs from the object
    edge = np.zeros_like(gt)
    cv2.drawContours(edge, cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0], -1, 1, 1)
    outline = drawn[edge > 0]
    for around in ((b, g, r), (90, 100, 80)):  # the ground truth's outline differs from the object and the ground
        assert np.linalg.norm(outline - around, axis=1).min() > 100
    # the written overlay has a legend: a swatch of each colour drawn, named, above the picture
    image = torch.from_numpy(((bgr[..., ::-1] / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()).float()
    evaluate.write_overlay(str(tmp_path), 7, 1, image, np.float64([[1, 0, 0], [0, 1, 0]]), (90, 120), pred, gt,
                           f"the {colour} circle", 1.0, prefix="best1_")
    written = cv2.imread(str(tmp_path / "best1_000007_1.png"))
    scale = written.shape[1] / 120
    band = written[:written.shape[0] - round(90 * scale)]
    legend = evaluate.overlay_colours(bgr, pred, gt)
    assert set(legend) == {'prediction', 'ground truth'}
    for name, (swatch, style) in legend.items():
        assert (band == swatch).all(axis=-1).sum() >= 40, name  # the swatch, in the colour drawn
    assert legend['prediction'][0] != legend['ground truth'][0]
    assert tuple(int(v) for v in evaluate.overlay(bgr, pred, gt)[edge > 0][0]) == legend['ground truth'][0]


def test_options_are_checked_and_quick_keeps_what_is_given():
    args = demo.parse_args(['--quick', '--steps', '50'])
    assert (args.steps, args.train_samples, args.val_samples, args.visualize) == (50, 4000, 200, 3)
    assert args.output == os.path.join('exp', 'demo_quick')
    assert demo.parse_args(['--seed', '3']).output == os.path.join('exp', 'demo_seed3')
    assert demo.parse_args([]).output == os.path.join('exp', 'demo') and demo.parse_args([]).visualize == 8
    for argv, message in ((['--batch-size', '0'], 'argument --batch-size: 0 is not allowed'),
                          (['--procs', '3'], 'not divisible by --procs 3'),
                          (['--lr', '-1e-3'], 'argument --lr: -1e-3 is not allowed'),
                          (['--lr-drops', '1.5'], 'argument --lr-drops'),
                          (['--train-samples', '8'], 'fewer than one batch')):
        with pytest.raises(UserError, match=message):
            demo.parse_args(argv)


@pytest.mark.skipif(os.environ.get('ETRIS_DEMO_FULL') != '1', reason="the full demo (~10 minutes a seed): set "
                                                                       "ETRIS_DEMO_FULL=1")
@pytest.mark.parametrize('seed', SEEDS)
def test_full_demo_holds_the_readme_claim(tmp_path, seed):
    results = demo.main(['--seed', str(seed), '--output', str(tmp_path), '--visualize', '0', '--explain', '0'])
    assert results['val']['mIoU'] >= 60.0, results['val']
    assert results['val']['mIoU'] >= results['best_text_blind']['mIoU'] + 25.0, results['text_blind']
    assert results['other_sentence']['mIoU'] < results['val']['mIoU'] - 30.0, results['other_sentence']
