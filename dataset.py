"""Referring-segmentation data for ETRIS: RefCOCO, RefCOCO+, RefCOCOg (umd / google), and the synthetic set of
synthetic.py behind the same interface.

Implements the data side of the paper's experiments (the datasets of Sec. 4.1; the 416 px input and the 17 / 22
tokens of Sec. 4.2) exactly as the authors' pipeline
(CRIS/ETRIS `utils/dataset.py`, `tools/data_process.py`, `tools/refer.py`) does it:
  - letterbox every image to input_size x input_size by an affine warp (scale = min(S/h, S/w),
    centred; image: cubic, border = CLIP mean * 255; mask: linear, then /255), RGB, CLIP mean/std;
  - train picks a random sentence of the ref, val sentence 0, test every sentence;
  - test keeps what the evaluation needs: the inverse warp, the original size and the mask.

Two on-disk layouts are read, and detected automatically under `root`:
  REFER release:   <root>/<refcoco|refcoco+|refcocog>/refs(<unc|umd|google>).p + instances.json
                   masks rasterised on the fly from COCO polygons / RLE (coco_mask.py, no pycocotools)
  prepared folder: <root>/anns/<dataset>/<split>.json + <root>/masks/<dataset>/<ref_id>.png
                   (what the authors' tools/data_process.py writes; prepare.py writes it too)
  both with COCO images in <root>/images/train2014/ (or <root>/train2014/).
The authors then pack the prepared folder into LMDB with pyarrow.serialize (gone from pyarrow);
we read the folder directly, the samples are the same.

Samples (dicts; collate stacks tensors and keeps per-image items as lists):
  every mode  image float32 [3,S,S], ref_id int, index int
  train       tokens long [L] (a random sentence), mask float32 [1,S,S] (letterboxed, soft edges)
  val         tokens long [L] (sentence 0), mask, + the test extras below for that one sentence
  test        tokens long [n_sent, L], sentences list[str], inverse float64 np [2,3] (input -> original
              coords), orig_size (h, w), orig_mask uint8 np [h,w] in {0,1}

Bad data is found when the dataset is built, so every bad ref is known before training starts: a
missing, empty, truncated (no JPEG end-of-image marker / PNG IEND chunk near the end) or non-JPEG/PNG
image or mask file, a ref without annotation or image, an empty sentence, a malformed segmentation
(see coco_mask.segmentation_to_mask for the polygon rule). Each raises one error naming the ref, its annotation
id (REFER layout) and the file, and saying what to do; with skip_bad=True the ref is left out, listed
in `dataset.bad_samples` (dicts: ref_id, ann_id, file, error) and one warning says how many. What still
fails when a sample is loaded (a file changed since, or undecodable despite a complete end) raises
BadSampleError, or with skip_bad travels to the main process in the batch: see RefDataset.__getitem__
and collate (batch['bad_samples']). The split's found vs published ref count is printed.

prepare.py writes the prepared folder from the REFER release.
"""
import json
import os
import pickle
import warnings

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from coco_mask import check_segmentation, segmentation_to_mask
from errors import UserError
from synthetic import synthetic_scene
from tokenizer import tokenize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORD_LEN = {'refcoco': 17, 'refcoco+': 17, 'refcocog_u': 22, 'refcocog_g': 22, 'synthetic': 17}

# name -> REFER folder, split_by, expected number of refs per split (the authors' `info` table)
DATASETS = {
    'refcoco': dict(folder='refcoco', split_by='unc', word_len=17,
                    splits={'train': 42404, 'val': 3811, 'testA': 1975, 'testB': 1810}),
    'refcoco+': dict(folder='refcoco+', split_by='unc', word_len=17,
                     splits={'train': 42278, 'val': 3805, 'testA': 1975, 'testB': 1798}),
    'refcocog_u': dict(folder='refcocog', split_by='umd', word_len=22,
                       splits={'train': 42226, 'val': 2573, 'test': 5023}),
    'refcocog_g': dict(folder='refcocog', split_by='google', word_len=22,
                       splits={'train': 44822, 'val': 5000}),
    'synthetic': dict(folder=None, split_by=None, word_len=17,
                      splits={'train': 2000, 'val': 200, 'test': 200}),
}
MODES = ('train', 'val', 'test')
_BORDER = [m * 255 for m in CLIP_MEAN]  # letterbox padding = the mean colour, i.e. 0 after normalisation
_MEAN = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
_STD = torch.tensor(CLIP_STD).reshape(3, 1, 1)


# ----------------------------------------------------------------------------- letterbox transform

def letterbox_matrix(h, w, size):
    """Affine maps original (h, w) image coords <-> size x size input coords, as the authors' getTransformMat."""
    scale = min(size / h, size / w)
    new_h, new_w = h * scale, w * scale
    bx, by = (size - new_w) / 2., (size - new_h) / 2.
    # same float32 corner points and cv2 solve as the authors, so the warps agree bit for bit
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [new_w + bx, by], [bx, new_h + by]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def to_input(img_rgb, size, mask255=None):
    """uint8 RGB [h,w,3] (+ uint8 0/255 mask [h,w]) -> normalised letterboxed image [3,S,S], soft mask
    [1,S,S] (None without a mask) and the inverse matrix [2,3]. Also used by predict.py for user images."""
    h, w = img_rgb.shape[:2]
    mat, inv = letterbox_matrix(h, w, size)
    img = cv2.warpAffine(img_rgb, mat, (size, size), flags=cv2.INTER_CUBIC, borderValue=_BORDER)
    image = torch.from_numpy(img.transpose(2, 0, 1)).float().div_(255.).sub_(_MEAN).div_(_STD).contiguous()
    mask = None
    if mask255 is not None:
        m = cv2.warpAffine(mask255, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.)
        mask = torch.from_numpy((m / 255.).astype(np.float32))[None]  # float64 division then cast, as theirs
    return image, mask, inv


def _make_sample(img_rgb, mask255, sentences, ref_id, index, mode, size, word_len):
    """The sample dict of the contract, shared by the real and the synthetic datasets."""
    image, mask, inv = to_input(img_rgb, size, mask255 if mode != 'test' else None)
    sample = {'image': image, 'ref_id': int(ref_id), 'index': int(index)}
    if mode == 'train':
        # torch's RNG: seeded per DataLoader worker, so the pick is reproducible from the loader seed
        pick = int(torch.randint(len(sentences), (1,)))
        sample['tokens'] = tokenize(sentences[pick], word_len, truncate=True)[0]
        sample['mask'] = mask
        return sample
    if mode == 'val':
        sentences = sentences[:1]
        sample['tokens'] = tokenize(sentences, word_len, truncate=True)[0]
        sample['mask'] = mask
    else:
        sample['tokens'] = tokenize(sentences, word_len, truncate=True)  # [n_sent, L]
    sample['sentences'] = list(sentences)
    sample['inverse'] = inv
    sample['orig_size'] = tuple(img_rgb.shape[:2])
    sample['orig_mask'] = (mask255 > 0).astype(np.uint8)
    return sample


# ----------------------------------------------------------------------------- complete image files

_JPEG_START, _JPEG_END = b'\xff\xd8\xff', b'\xff\xd9'
_PNG_START, _PNG_END = b'\x89PNG\r\n\x1a\n', b'IEND\xaeB`\x82'
# The end marker is looked for in this many final bytes, not only the last two: some writers pad or
# append a trailer after it. Entropy-coded JPEG data never holds FF D9 (an FF there is followed by
# 00 or a restart code), so finding it in a truncated file's tail would take a file this short.
_TAIL_BYTES = 4096


def _image_bytes_problem(head, tail, any_format):
    """Why a file starting with `head` and ending with `tail` is not a complete JPEG or PNG, or None."""
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(_JPEG_START):
        return None if _JPEG_END in tail else \
            f"is a truncated JPEG (no end-of-image marker FF D9 in its last {len(tail)} bytes)"
    if head.startswith(_PNG_START):
        return None if _PNG_END in tail else f"is a truncated PNG (no IEND chunk in its last {len(tail)} bytes)"
    return None if any_format else f"is neither a JPEG nor a PNG file (it starts with {head[:8]!r})"


def check_image_file(path, any_format=False):
    """Raise ValueError if the JPEG or PNG file at `path` is empty or truncated, reading only its first
    8 and last 4096 bytes. OpenCV decodes a truncated JPEG without an error (the missing rows come out
    grey; only libjpeg prints "Premature end of JPEG file"), so this is how one is caught. Other formats
    are an error too, unless any_format (then they are left to the decoder)."""
    with open(path, 'rb') as f:
        head = f.read(8)
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        problem = _image_bytes_problem(head, f.read(), any_format)
    if problem:
        raise ValueError(f"{os.fspath(path)} {problem}")


def read_image_file(path, flags=cv2.IMREAD_COLOR, any_format=False):
    """cv2.imdecode of a file (BGR, or gray with IMREAD_GRAYSCALE) after check_image_file's test on the
    bytes read: one reading of the file for both. ValueError names the file when either fails."""
    data = np.fromfile(path, np.uint8)
    problem = _image_bytes_problem(data[:8].tobytes(), data[-_TAIL_BYTES:].tobytes(), any_format)
    if problem:
        raise ValueError(f"{os.fspath(path)} {problem}")
    img = cv2.imdecode(data, flags)
    if img is None:
        raise ValueError(f"{os.fspath(path)} could not be decoded: corrupt, or not an image format OpenCV reads")
    return img


# ----------------------------------------------------------------------------- reading the two layouts

class _PlainUnpickler(pickle.Unpickler):
    """Only builds plain containers and scalars: any class or callable (os.system, ...) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_refs_pickle(path):
    """The REFER refs(<split_by>).p (a Python 2 pickle of dicts/lists/strings), read without executing code."""
    with open(path, 'rb') as f:
        try:
            return _PlainUnpickler(f, encoding='utf-8').load()
        except Exception as e:
            raise UserError(f"{path}: not a plain REFER refs pickle ({e}); it may hold only dicts, lists, "
                             "strings and numbers. Download it again from the REFER release.") from None


def _image_dir(root):
    for d in (os.path.join(root, 'images', 'train2014'), os.path.join(root, 'train2014')):
        if os.path.isdir(d):
            return d
    raise UserError(f"no COCO train2014 images under {root}: download "
                            "http://images.cocodataset.org/zips/train2014.zip and unzip it into "
                            f"{os.path.join(root, 'images')} (giving {os.path.join(root, 'images', 'train2014')})")


def detect_layout(root, name, split):
    """'prepared' if <root>/anns/<name>/<split>.json exists, 'refer' if the REFER release is there."""
    info = DATASETS[name]
    if os.path.isfile(os.path.join(root, 'anns', name, f'{split}.json')):
        return 'prepared'
    if os.path.isfile(os.path.join(root, info['folder'], f"refs({info['split_by']}).p")):
        return 'refer'
    raise UserError(
        f"no {name} data under {root!r}. Put there either the REFER release "
        f"({info['folder']}/refs({info['split_by']}).p + {info['folder']}/instances.json: download "
        f"https://bvisionweb1.cs.unc.edu/licheng/referit/data/{info['folder']}.zip and unzip it into {root}) "
        f"or the prepared folder (anns/{name}/{split}.json + masks/{name}/, written by "
        f"`python prepare.py`), plus COCO train2014 images in {os.path.join(root, 'images', 'train2014')} "
        "(http://images.cocodataset.org/zips/train2014.zip).")


def _in_split(ref_split, split):
    # REFER's getRefIds: testA/testB also take testAB..., 'test' takes every test* split
    if split in ('testA', 'testB', 'testC'):
        return split[-1] in ref_split
    if split == 'test':
        return 'test' in ref_split
    return ref_split == split


_ONE_RELEASE = "take refs(...).p and instances.json from one download of the REFER release"


def _read_refer(root, name, split):
    """Records of one split of the REFER release, in the release's order (= the authors' json order)."""
    info = DATASETS[name]
    folder = os.path.join(root, info['folder'])
    refs_path = os.path.join(folder, f"refs({info['split_by']}).p")
    refs = load_refs_pickle(refs_path)
    inst_path = os.path.join(folder, 'instances.json')
    if not os.path.isfile(inst_path):
        raise UserError(f"{inst_path} is missing: it comes with the REFER release "
                                f"https://bvisionweb1.cs.unc.edu/licheng/referit/data/{info['folder']}.zip")
    with open(inst_path) as f:
        inst = json.load(f)
    images = {im['id']: im for im in inst['images']}
    anns = {a['id']: a for a in inst['annotations']}
    img_dir = _image_dir(root)
    records = []
    for ref in refs:
        if not _in_split(ref['split'], split):
            continue
        rec = {'ref_id': ref['ref_id'], 'ann_id': ref['ann_id'], 'source': inst_path, 'refs_file': refs_path,
               'sentences': [s['sent'].strip() for s in ref['sentences']]}
        ann, im = anns.get(ref['ann_id']), images.get(ref['image_id'])
        if ann is None:
            rec['error'] = UserError(f"ref {ref['ref_id']} points at annotation {ref['ann_id']}, which "
                                      f"{inst_path} does not have; {_ONE_RELEASE}")
        elif im is None:
            rec['error'] = UserError(f"ref {ref['ref_id']} (annotation {ref['ann_id']}) points at image "
                                      f"{ref['image_id']}, which {inst_path} does not have; {_ONE_RELEASE}")
        else:
            rec.update(image=os.path.join(img_dir, im['file_name']), size=(im['height'], im['width']),
                       segmentation=ann.get('segmentation'), bbox=ann['bbox'], category_id=ref['category_id'],
                       sent_ids=[s['sent_id'] for s in ref['sentences']])
        records.append(rec)
    return records


def _read_prepared(root, name, split):
    """Records of anns/<name>/<split>.json, masks from masks/<name>/<segment_id>.png."""
    path = os.path.join(root, 'anns', name, f'{split}.json')
    with open(path) as f:
        items = json.load(f)
    img_dir, mask_dir = _image_dir(root), os.path.join(root, 'masks', name)
    return [{'ref_id': it['segment_id'], 'source': path, 'refs_file': path,
             'image': os.path.join(img_dir, it['img_name']),
             'mask': os.path.join(mask_dir, f"{it['segment_id']}.png"),
             'sentences': [s['sent'].strip() for s in it['sentences']]} for it in items]


_FIX = {'image': "put a complete copy there (download COCO train2014 again)",
        'mask': "run `python prepare.py` again, it rewrites missing and truncated masks"}


def _who(rec):
    """'ref 12 (annotation 345)': how an error names a record (prepared folders keep no annotation id)."""
    return f"ref {rec['ref_id']}" + (f" (annotation {rec['ann_id']})" if rec.get('ann_id') is not None else '')


def _bad_entry(rec, file, err):
    """A dataset.bad_samples entry."""
    return {'ref_id': rec['ref_id'], 'ann_id': rec.get('ann_id'), 'file': file, 'error': str(err)}


def _raise_bad(err):
    """Raise a bad ref's error, telling how to go on without it (entries of bad_samples leave that out)."""
    err.args = (f"{err}, or pass --skip-bad (skip_bad=True) to leave such refs out and list them at the end",)
    raise err


def _record_problem(rec, checked):
    """(error, file at fault) that makes a record unusable, or None; found without decoding anything.
    Files get check_image_file's tail test, each file once: `checked` maps path -> problem or None."""
    if 'error' in rec:
        return rec['error'], rec['source']
    if not rec['sentences'] or any(not s for s in rec['sentences']):
        return UserError(f"{_who(rec)} has an empty sentence in {rec['refs_file']}: {rec['sentences']!r}; "
                          "fix the sentence"), rec['refs_file']
    for key in ('image', 'mask'):
        if key not in rec:
            continue
        path = rec[key]
        if path not in checked:
            try:
                check_image_file(path)
                checked[path] = None
            except FileNotFoundError:
                checked[path] = 'missing'
            except (OSError, ValueError) as e:
                checked[path] = str(e)
        if checked[path] == 'missing':
            return UserError(f"{_who(rec)}: {key} file {path} is missing; {_FIX[key]}"), path
        if checked[path]:
            return UserError(f"{_who(rec)}: {key} file {checked[path]}; {_FIX[key]}"), path
    if 'segmentation' in rec:
        try:
            check_segmentation(rec['segmentation'], *rec['size'])
        except ValueError as e:
            return UserError(f"{_who(rec)}: bad segmentation in {rec['source']}: {e}; fix the annotation"), \
                rec['source']
    return None


def _split_size_line(name, split, found, where):
    """The found vs published ref count of a split, printed when a dataset is built and by prepare."""
    expected = DATASETS[name]['splits'][split]
    diff = found - expected
    verdict = "the paper's split" if not diff else \
        f"{abs(diff)} {'more' if diff > 0 else 'fewer'}, not the paper's split"
    return f"{name} {split}: found {found} refs, published {expected}: {verdict} ({where})"


class BadSampleError(UserError):
    """A record that failed to load: the message names the ref and annotation, `file` the file at fault."""

    def __init__(self, message, file=None):  # file=None: as a DataLoader worker's error is rebuilt from its text
        super().__init__(message)
        self.file = file


class RefDataset(Dataset):
    """One split of RefCOCO/+/g from the REFER release or the prepared folder (layout auto-detected)."""

    def __init__(self, root, name, split, mode, input_size, word_len, skip_bad=False, num_samples=None,
                 verbose=True):
        self.name, self.split, self.mode = name, split, mode
        self.input_size, self.word_len, self.skip_bad = input_size, word_len, skip_bad
        self.layout = detect_layout(root, name, split)
        records = (_read_refer if self.layout == 'refer' else _read_prepared)(root, name, split)
        self.split_size = _split_size_line(name, split, len(records), f"{root}, {self.layout} layout")
        if verbose:
            print(self.split_size)
        expected = DATASETS[name]['splits'][split]
        if len(records) != expected:
            warnings.warn(f"{name} {split}: expected {expected} refs (the paper's split), found "
                          f"{len(records)} in {root} ({self.layout} layout)")
        if num_samples is not None:
            records = records[:num_samples]
        self.records, self.bad_samples, checked = [], [], {}
        for rec in records:
            problem = _record_problem(rec, checked)
            if problem is None:
                self.records.append(rec)
            elif skip_bad:
                self.bad_samples.append(_bad_entry(rec, problem[1], problem[0]))
            else:
                _raise_bad(problem[0])
        if self.bad_samples:
            warnings.warn(f"{name} {split}: skipped {len(self.bad_samples)} bad refs of {len(records)} "
                          f"(dataset.bad_samples); first: {self.bad_samples[0]['error']}")
        if not self.records:
            raise UserError(f"{name} {split}: no usable refs under {root}")

    def __len__(self):
        return len(self.records)

    def load(self, index):
        """(uint8 RGB image [h,w,3], uint8 0/255 mask [h,w], sentences) of a record, decoded.
        BadSampleError for what the build-time checks cannot see: a file that changed since, or one
        complete at its end yet undecodable."""
        rec = self.records[index]
        who = _who(rec)
        try:
            img = cv2.cvtColor(read_image_file(rec['image']), cv2.COLOR_BGR2RGB)
        except (OSError, ValueError) as e:
            raise BadSampleError(f"{who}: image {e}; {_FIX['image']}", rec['image']) from None
        if 'mask' in rec:
            try:
                mask = read_image_file(rec['mask'], cv2.IMREAD_GRAYSCALE)
            except (OSError, ValueError) as e:
                raise BadSampleError(f"{who}: mask {e}; {_FIX['mask']}", rec['mask']) from None
        else:
            if img.shape[:2] != tuple(rec['size']):
                raise BadSampleError(f"{who}: image {rec['image']} is {img.shape[:2]}, {rec['source']} says "
                                     f"{tuple(rec['size'])}; {_FIX['image']}", rec['image'])
            try:
                mask = segmentation_to_mask(rec['segmentation'], *img.shape[:2]) * np.uint8(255)
            except ValueError as e:
                raise BadSampleError(f"{who}: bad segmentation in {rec['source']}: {e}; fix the annotation",
                                     rec['source']) from None
        if mask.shape != img.shape[:2]:
            raise BadSampleError(f"{who}: mask {rec.get('mask')} is {mask.shape}, image {rec['image']} is "
                                 f"{img.shape[:2]}; {_FIX['mask']}", rec.get('mask'))
        return img, mask, rec['sentences']

    def __getitem__(self, index):
        """The sample of `index`. With skip_bad, a record that fails to load is not an error: in train
        mode the next good index stands in for it (a batch keeps its size); in val/test modes nothing
        stands in (evaluation would count that sample twice) and the result is {'bad_samples': [entry]}.
        Either way the failure travels in the returned dict's 'bad_samples' (bad_samples entries plus
        'index'), which collate gathers into batch['bad_samples']: a DataLoader worker's copy of the
        dataset is out of the main process's reach, the batch is not."""
        skipped = []
        for i in range(len(self.records)):
            j = (index + i) % len(self.records)
            try:
                img, mask, sentences = self.load(j)
            except BadSampleError as e:
                if not self.skip_bad:
                    _raise_bad(e)
                skipped.append({**_bad_entry(self.records[j], e.file, e), 'index': j})
                warnings.warn(f"skipping bad sample: {e}")
                if self.mode != 'train':
                    return {'bad_samples': skipped}
                continue
            sample = _make_sample(img, mask, sentences, self.records[j]['ref_id'], j, self.mode,
                                  self.input_size, self.word_len)
            if skipped:
                sample['bad_samples'] = skipped
            return sample
        raise UserError(f"{self.name} {self.split}: every sample failed to load")


class SyntheticRefDataset(Dataset):
    """The scenes of synthetic.py (procedural shapes that only language disambiguates) as RefDataset's samples."""

    def __init__(self, split, mode, input_size, word_len, seed=0, num_samples=None):
        self.name, self.split, self.mode = 'synthetic', split, mode
        self.input_size, self.word_len, self.seed = input_size, word_len, seed
        self.num_samples = DATASETS['synthetic']['splits'][split] if num_samples is None else num_samples
        self.bad_samples = []

    def __len__(self):
        return self.num_samples

    def scene(self, index):
        return synthetic_scene(self.seed, self.split, index)

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        sc = self.scene(index)
        mask = sc['objects'][sc['target']]['mask'] * np.uint8(255)
        return _make_sample(sc['image'], mask, sc['sentences'], index, index, self.mode,
                            self.input_size, self.word_len)


# ----------------------------------------------------------------------------- public builders

def build_dataset(name, split, root=None, input_size=416, word_len=None, mode=None, skip_bad=False,
                  seed=0, num_samples=None, verbose=True):
    """A map-style dataset of `name` / `split`; see the module docstring for layouts and sample keys.

    mode: 'train' | 'val' | 'test' (default from the split). num_samples: synthetic split size, or
    the first N refs of a real split (for quick runs). seed: synthetic only. verbose: print the split's
    found vs published ref count (real datasets; also in dataset.split_size).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    splits = DATASETS[name]['splits']
    if split not in splits:
        raise UserError(f"unknown split {split!r} for {name}; valid: {', '.join(splits)}")
    mode = mode or {'train': 'train', 'val': 'val'}.get(split, 'test')
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    word_len = word_len or WORD_LEN[name]
    if name == 'synthetic':
        return SyntheticRefDataset(split, mode, input_size, word_len, seed, num_samples)
    if root is None:
        raise UserError(f"{name} needs root=: the folder holding the REFER release or the prepared folder")
    return RefDataset(root, name, split, mode, input_size, word_len, skip_bad, num_samples, verbose)


_LIST_KEYS = ('sentences', 'inverse', 'orig_size', 'orig_mask')


def collate(samples):
    """Batch dict: fixed-size tensors stacked, ints as a LongTensor, variable-size items as lists.

    Samples that failed to load (skip_bad, see RefDataset.__getitem__) are left out; their entries are
    in batch['bad_samples'], present only when there are some. A batch of failures only is
    {'bad_samples': [...]}, with no other key."""
    bad = [entry for s in samples for entry in s.get('bad_samples', ())]
    samples = [s for s in samples if 'image' in s]
    batch = {}
    for key in (samples[0] if samples else ()):
        if key == 'bad_samples':
            continue
        vals = [s[key] for s in samples]
        if key in _LIST_KEYS or (key == 'tokens' and vals[0].dim() == 2):  # test tokens: [n_sent, L] each
            batch[key] = vals
        elif isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        else:
            batch[key] = torch.tensor(vals)
    if bad:
        batch['bad_samples'] = bad
    return batch


def _worker_init(worker_id):
    cv2.setNumThreads(0)  # one decoding thread per worker, as the authors; workers are the parallelism


def default_workers():
    """Data-loader workers per process when --workers is not given: the CPUs this process may use, shared by the
    node's processes (torchrun's LOCAL_WORLD_SIZE), at least 1 and at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def build_loader(dataset, batch_size, workers=0, sampler=None, shard=(0, 1), pin_memory=False, seed=0):
    """The one DataLoader of train.py, evaluate.py, the demo and the benchmark, with the authors' collate.

    sampler: the order to read in (train.py's ResumableSampler). Without one, the loader reads this process's
    shard in order: indices rank, rank + world, ... for shard=(rank, world), with no padding, so that an
    evaluation over all processes counts every sample once. Workers decode with one OpenCV thread each and
    persist across epochs."""
    if sampler is None:
        rank, world = shard
        sampler = range(rank, len(dataset), world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))  # so the global RNG is left alone
