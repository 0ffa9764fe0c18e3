"""Everything the scripts share: data readers, uint8 cache, batched augmentations, ResNet
backbones and weight loading, Barlow Twins, LARS, schedules, the AMP/DDP training loop,
metrics and logging. Depends only on torch, torchvision, numpy and pillow.

A library to copy: every function takes plain keyword arguments (never a scripts' flags
object), and tests/test_library.py drives this file alone from a 40-line script. Read it top
to bottom: each `# ---` banner is one topic, in this order.

  errors, files      UserError, main_guard, os_error, check_writable, claim, tmp_name,
                     remove_stale_tmp, atomic_write, write_json, read_json, torch_save,
                     append_jsonl, read_jsonl, read_csv, few
  dataset readers    read_dataset (auto-detects ImageFolder, folder, ISIC 2019/2020,
                     HAM10000, DermaMNIST), make_dataset, load_image
  splits             make_split, PAPER_PER_CLASS, per_class_arg, save_split, load_split,
                     split_path, labelled_subset, pool_subset
  uint8 cache        build_cache, find_cache, fingerprint, cache_fingerprint, fmt_time
  loader             make_loader, CachedImages, EpochBatches, prepare_cache,
                     cache_positions, to_device, dataset_name
  augmentations      preset_params, draw_params, take_params, apply_params, augment,
                     augment_views
  command line       add_data_args, add_model_args, add_runtime_args, add_train_args,
                     add_eval_args, parse_args, parse_seeds, number, default_workers
  runtime            dist_info, setup_runtime, seeds_of, share, local_batch, teardown, settle,
                     print0
  backbone, weights  make_backbone, load_backbone, load_checkpoint, clean_state_dict,
                     hub_file, init_file, state_fingerprint
  Barlow Twins       make_projector, barlow_loss, BarlowTwins, Classifier, classifier_task
  optimisers         LARS, make_optimizer, lr_factor
  training loop      wrap_model, step_generator, grad_scaler, train_step, fit,
                     write_handoff, git_revision, lr_range_test, phase_lr, predict
  evaluation runs    get_split, split_sha, lineage_entry, init_lineage, path_overlaps,
                     check_held_out, init_meta, label_counts, short_classes, labels_rule,
                     result_stub, result_key, done_keys, pending_rows, run_seeds
  metrics            classification_metrics, knn_predict, feature_stats
  using a model      save_classifier, load_classifier, classifier_views, predict_images
  command line tools `python common.py split|cache|predict ...`
"""
import argparse
import collections
import copy
import csv
import datetime
import errno
import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import types
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import fcntl  # run-folder locks (claim); absent on Windows
except ImportError:
    fcntl = None

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


# --------------------------------------------------------------------------- errors, files
class UserError(Exception):
    """A mistake in the input (file, flag, checkpoint): printed as one line, exit status 2."""


def main_guard(fn):
    """Run fn(); turn an expected mistake into one line on stderr and exit status 2, no
    traceback: a UserError, an OSError (permissions, a missing or wrong-kind path, a full disk,
    a symlink loop; named by its path), a text input that is not UTF-8, or a batch too big for
    the GPU's memory. Anything else is a bug and keeps its traceback."""
    try:
        fn()
        return
    except UserError as e:
        msg = str(e)
    except torch.OutOfMemoryError as e:  # torch's first sentences: the sizes involved
        said = (str(e).strip().splitlines() or [''])[0].split('. Including')[0][:300]
        msg = (f'out of GPU memory ({said}); lower --batch-size (it is global: each '
               f'rank gets its share) or --size, or spread the batch over more GPUs with '
               f'torchrun. A training run resumes from its last checkpoint')
    except OSError as e:
        msg = os_error(e)
    except UnicodeDecodeError as e:  # readers name the file; this is the fallback
        msg = f'a text input is not UTF-8 ({e.reason} at byte {e.start}); is it the right file?'
    except KeyboardInterrupt:  # Ctrl-C outside training (fit checkpoints on its own)
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


_OS_HINTS = {  # errno -> what to do, for os_error
    'EACCES': 'no permission: fix its permissions or choose another path',
    'EPERM': 'not permitted: fix its permissions or choose another path',
    'EROFS': 'a read-only filesystem: choose another path',
    'ENOSPC': 'the disk is full: free space or choose another path',
    'EDQUOT': 'the disk quota is exceeded: free space or choose another path',
    'ENOTDIR': 'a file stands where a folder is expected',
    'EISDIR': 'a folder stands where a file is expected',
    'ELOOP': 'a symlink loop',
    'ENOENT': 'no such file or folder',
    'EEXIST': 'already exists and is in the way',
}


def os_error(e):
    """One line for an OSError: the path(s) it names, what went wrong, what to do."""
    paths = ' -> '.join(str(p) for p in (e.filename, e.filename2) if p is not None)
    hint = _OS_HINTS.get(errno.errorcode.get(e.errno, ''), e.strerror or str(e))
    return f'{paths}: {hint}' if paths else f'{e.strerror or e}: {hint}'


# Temporary names carry host and pid: a later run removes those its host's dead processes
# left (a killed write), never a live writer's, even on a filesystem shared by nodes.
_HOST = re.sub(r'[^\w.]', '_', os.uname().nodename if hasattr(os, 'uname') else 'host')


def check_writable(path, flag, kind='dir'):
    """Refuse at start-up, before any work, an output location that cannot be written, with
    one line naming it. kind: 'dir' (a folder, made if missing), 'file' (written by rename),
    'append' (a file appended to). The test creates and removes a temporary file in the
    folder (or its nearest existing ancestor): permission bits say nothing for root or a
    read-only mount, a real write does."""
    if not str(path).strip():
        raise UserError(f'{flag} is empty; give a path')
    path = os.path.abspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f'{flag} {path}: a dangling symlink or a symlink loop')
    if kind == 'dir' and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path}: is a file; a folder is expected there')
    if kind != 'dir' and os.path.isdir(path):
        raise UserError(f'{flag} {path}: is a folder; a file is expected there')
    folder = path if kind == 'dir' else os.path.dirname(path)
    while not os.path.exists(folder):  # made later: the nearest existing ancestor decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {path}: {folder} is a file, so nothing can be made below it')
    probe = os.path.join(folder, f'.write-test.{_HOST}-{os.getpid()}')
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.remove(probe)
        if kind == 'append' and os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        raise UserError(f'{flag} {path}: cannot be written ({os_error(e)})')


_CLAIMED = {}  # lock file -> its descriptor, locked until this process exits


def claim(folder, flag='--out'):
    """Hold folder/.lock (flock) until this process exits, so that a second copy of the
    same command cannot train into the folder at the same time and mix checkpoints. The
    kernel releases the lock of a killed process, so nothing stale remains. Rank 0 only."""
    if fcntl is None:  # no flock on this platform: no guard
        return
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(os.path.realpath(folder), '.lock')
    if lock in _CLAIMED:  # ours already (a second run in one process): take it afresh
        os.close(_CLAIMED.pop(lock))
    try:  # the lock is truncated and written: never through a link to another file
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UserError(f'{flag} {folder}: its .lock is a symbolic link; remove it')
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # no flock on this filesystem
            os.close(fd)
            return
        holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        raise UserError(f'{flag} {folder} is in use by {holder}; wait for it to finish, or '
                        f'use another {flag}')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'process {os.getpid()} on {_HOST}'.encode(), 0)
    _CLAIMED[lock] = fd


_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)  # not on Windows


def tmp_name(path, suffix='.tmp'):
    return f'{path}.{_HOST}-{os.getpid()}{suffix}'


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def remove_stale_tmp(path):
    """Remove the temporary files of `path` (tmp_name's, any suffix) that a killed process of
    this host left behind; returns how many."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r'\.(.+)-(\d+)\.tmp[\w.]*$')
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = pattern.match(name)
        if m and m.group(1) == _HOST and int(m.group(2)) != os.getpid() and \
                not _alive(int(m.group(2))):
            try:
                os.remove(os.path.join(folder, name))
                removed += 1
            except FileNotFoundError:  # another run cleaned it first
                pass
    return removed


def atomic_write(path, write_fn, mode='w'):
    """Write through write_fn(file) to a temporary name, on disk (fsync), then rename: never
    half a file, even after a crash of the machine (the rename is synced too where the
    filesystem allows). Temporary files a killed earlier write left beside it are removed
    first."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_tmp(path)
    tmp = tmp_name(path)
    try:
        if os.path.lexists(tmp):  # ours from a killed run under a reused pid (or planted)
            os.remove(tmp)
        # a new file, never one through a link planted at the predictable name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # a filesystem that cannot sync a folder: the file itself is synced
            pass
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1))


def read_json(path, what='file'):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f'{what} {path} does not exist')
    except IsADirectoryError:
        raise UserError(f'{what} {path} is a folder; a JSON file is expected')
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else 'not UTF-8 text'
        raise UserError(f'{what} {path} is not valid JSON ({why}); delete it or pass another')


def torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), mode='wb')


def append_jsonl(path, row, sync=False):
    """Append one JSON line in a single write call (O_APPEND keeps concurrent lines whole).
    A file whose last line is incomplete (a killed writer, a full disk) gets a newline first,
    so the row never glues onto it; readers name that torn line. sync=True also puts it on
    disk before returning (a result row, before its seed's checkpoint is removed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(row) + '\n').encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b'\n':
            print0(f'note: {path} ended with an incomplete line; the new row starts a line '
                   f'of its own')
            line = b'\n' + line
        if os.write(fd, line) < len(line):  # a full disk may take part of it, silently
            raise OSError(errno.ENOSPC, 'short write', path)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """(line number, object) for each line of a JSON-lines file. A line cut short by a killed
    writer or a full disk (it starts like a JSON object but does not parse; anywhere, since
    append_jsonl starts a new line after it) is named as path:line on stderr and skipped;
    any other line that is not a JSON object is refused, naming it."""
    out = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if line.lstrip().startswith('{'):
                    print0(f'warning: {path}:{lineno}: an incomplete line (a write cut '
                           f'short), ignored', file=sys.stderr)
                    continue
                raise UserError(f'{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno});'
                                f' fix or delete that line')
            if not isinstance(obj, dict):
                raise UserError(f'{path}:{lineno}: expected a JSON object, got '
                                f'{type(obj).__name__}; fix or delete that line')
            out.append((lineno, obj))
    return out


def read_csv(path, required):
    """Rows of a CSV as dicts; one clear error when the file or a required column is missing."""
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in required if c not in cols]
            if missing:
                raise UserError(f'{path}: missing column(s) {", ".join(missing)} '
                                f'(found: {", ".join(cols) or "nothing"})')
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        why = 'not UTF-8 text' if isinstance(e, UnicodeDecodeError) else str(e)
        raise UserError(f'{path}: not a readable CSV ({why}); is it the right file?')


def few(items, n=5):
    """'a, b, c and 7 more' for error messages."""
    items = list(items)
    head = ', '.join(str(i) for i in items[:n])
    return head + (f' and {len(items) - n} more' if len(items) > n else '')


# --------------------------------------------------------------------------- dataset readers
# A reader turns a path into a dataset: a dict of parallel lists, one entry per image.
#   {'format': str, 'root': str, 'classes': [names], 'ids': [str], 'paths': [str],
#    'labels': [int, -1 when unlabelled], 'groups': [str, the lesion/patient; the id if none],
#    'official': None or ['train'|'val'|'test' per image]}
# A path of the form 'file.npz:key:index' names one image inside an array file (DermaMNIST).
# To add a format: write detect(path) -> bool and read(path, opts) -> dataset, then register
# it in READERS; auto-detection tries the entries in order, the generic folders last.

def make_dataset(fmt, root, classes, ids, paths, labels, groups=None, official=None):
    dup = [i for i, n in collections.Counter(ids).items() if n > 1]
    if dup:
        raise UserError(f'{root}: duplicate image ids {few(dup)}; ids must be unique')
    return {'format': fmt, 'root': os.path.abspath(root), 'classes': list(classes),
            'ids': list(ids), 'paths': list(paths), 'labels': [int(l) for l in labels],
            'groups': list(groups) if groups is not None else list(ids),
            'official': list(official) if official is not None else None}


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith('.')


def _find_images(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith('.'))
        out += [os.path.join(d, f) for f in sorted(files) if _is_image(f)]
    return out


def _detect_imagefolder(path):
    if not os.path.isdir(path):
        return False
    subs = [e for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')]
    loose = [e for e in os.scandir(path) if e.is_file() and _is_image(e.name)]
    # one class folder with images is enough: an empty one must not turn a labelled dataset
    # into an unlabelled folder without a word (the reader refuses it, naming it)
    return bool(subs) and not loose and any(_has_images(s.path) for s in subs)


def _has_images(folder):
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith('.')]
        if any(_is_image(f) for f in files):
            return True
    return False


def _read_imagefolder(path, opts):
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))
    ids, paths, labels, empty = [], [], [], []
    for k, c in enumerate(classes):
        found = _find_images(os.path.join(path, c))
        empty += [] if found else [c]
        for p in found:
            ids.append(os.path.relpath(p, path))
            paths.append(p)
            labels.append(k)
    if not paths:
        raise UserError(f'{path}: no images in its class folders ({few(classes)}); '
                        f'expected root/<class>/*.jpg')
    if empty:  # as torchvision's ImageFolder: a class without images cannot be learnt
        raise UserError(f'{path}: class folder(s) {few(empty)} hold no images (the other '
                        f'{len(classes) - len(empty)} do); add images or remove the empty '
                        f'folder(s), or pass --format folder to read it unlabelled')
    return make_dataset('imagefolder', path, classes, ids, paths, labels)


def _detect_folder(path):
    return os.path.isdir(path)


def _read_folder(path, opts):
    paths = _find_images(path)
    if not paths:
        raise UserError(f'{path}: no images found (looked for {" ".join(IMAGE_EXTS)}, '
                        f'recursively)')
    ids = [os.path.relpath(p, path) for p in paths]
    return make_dataset('folder', path, [], ids, paths, [-1] * len(paths))


def _csv_header(path):
    """Column names of a CSV, [] when it cannot be read (detection must never raise)."""
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _csv_next_to(path, name):
    """(csv file, dataset root) for --data pointing at the root folder or at the CSV itself."""
    file = os.path.join(path, name) if os.path.isdir(path) else path
    return file, os.path.dirname(os.path.abspath(file))


def _check_files(paths, listed_in, folder):
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f'{len(missing)} image file(s) listed in {listed_in} are missing from '
                        f'{folder}: {few(missing)}; is the download complete?')


# ISIC 2019: one-hot CSV; UNK (unknown, used only in the test set) is not a class
ISIC2019_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']
_ISIC2019_CSV = 'ISIC_2019_Training_GroundTruth.csv'
_ISIC2019_DIR = 'ISIC_2019_Training_Input'


def _detect_isic2019(path):
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, _ISIC2019_CSV))
    head = _csv_header(path) if path.lower().endswith('.csv') else []
    return 'image' in head and all(c in head for c in ISIC2019_CLASSES)


def _read_isic2019(path, opts):
    """opts: drop_downsampled=True removes the '*_downsampled' copies, as the paper does."""
    file, root = _csv_next_to(path, _ISIC2019_CSV)
    rows = read_csv(file, ['image'] + ISIC2019_CLASSES)
    folder = os.path.join(root, _ISIC2019_DIR)
    if os.path.isdir(os.path.join(folder, _ISIC2019_DIR)):  # some mirrors unzip one level deeper
        folder = os.path.join(folder, _ISIC2019_DIR)
    if not os.path.isdir(folder):
        raise UserError(f'{root}: no {_ISIC2019_DIR}/ folder next to {os.path.basename(file)}')
    ids, labels, bad, unk = [], [], [], 0
    for row, r in enumerate(rows, start=2):  # row 1 is the header
        name = (r['image'] or '').strip()
        name = name[:-4] if name.lower().endswith('.jpg') else name
        try:
            v = [float((r[c] or '').strip()) for c in ISIC2019_CLASSES]
            u = float((r.get('UNK') or '0').strip())
        except ValueError:
            bad.append(f'{name or f"row {row}"} (not numbers)')
            continue
        if u == 1 and sum(v) == 0:  # an unknown diagnosis: no class to learn, leave it out
            unk += 1
        elif not name:
            bad.append(f'row {row} (no image name)')
        elif sorted(v) == [0] * 7 + [1] and u == 0:
            ids.append(name)
            labels.append(v.index(1))
        else:
            on = [c for c, x in zip(ISIC2019_CLASSES + ['UNK'], v + [u]) if x]
            bad.append(f'{name} ({"+".join(on) or "none"})')
    if bad:
        raise UserError(f'{file}: {len(bad)} row(s) whose labels {" ".join(ISIC2019_CLASSES)} '
                        f'do not sum to 1 (exactly one class per image): {few(bad)}')
    if unk:
        print0(f'note: {file}: left out {unk} image(s) labelled UNK (unknown diagnosis)')
    if opts.get('drop_downsampled'):
        keep = [k for k, i in enumerate(ids) if 'downsampled' not in i]
        print0(f'note: {file}: dropped {len(ids) - len(keep)} *downsampled* image(s), as the paper')
        ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
    paths = [os.path.join(folder, i + '.jpg') for i in ids]
    _check_files(paths, file, folder)
    # lesion_id groups images of one lesion; older copies of the metadata lack the column
    lesion, meta = {}, os.path.join(root, 'ISIC_2019_Training_Metadata.csv')
    if os.path.isfile(meta):
        mrows = read_csv(meta, ['image'])
        if mrows and 'lesion_id' in mrows[0]:
            lesion = {(r['image'] or '').strip(): (r['lesion_id'] or '').strip() for r in mrows}
        else:
            print0(f'note: {meta} has no lesion_id column: every image is its own group')
    groups = [lesion.get(i) or i for i in ids]
    return make_dataset('isic2019', root, ISIC2019_CLASSES, ids, paths, labels, groups)


# ISIC 2020: train.csv + jpeg/train/<image_name>.jpg; several images per patient
def _detect_isic2020(path):
    if os.path.isdir(path):
        return (os.path.isfile(os.path.join(path, 'train.csv'))
                and os.path.isdir(os.path.join(path, 'jpeg', 'train')))
    head = _csv_header(path) if path.lower().endswith('.csv') else []
    return all(c in head for c in ('image_name', 'patient_id', 'target'))


def _read_isic2020(path, opts):
    """opts: label='target' (benign, malignant; default) or 'diagnosis' (sorted unique values)."""
    label = opts.get('label') or 'target'
    if label not in ('target', 'diagnosis'):
        raise UserError(f'isic2020 label {label!r}: choose target or diagnosis')
    file, root = _csv_next_to(path, 'train.csv')
    rows = read_csv(file, ['image_name', 'patient_id', label])
    folder = os.path.join(root, 'jpeg', 'train')
    if not os.path.isdir(folder):
        raise UserError(f'{root}: no jpeg/train/ folder next to {os.path.basename(file)}')
    ids = [(r['image_name'] or '').strip() for r in rows]
    values = [(r[label] or '').strip() for r in rows]
    if label == 'target':
        classes = ['benign', 'malignant']
        values = [{'0': 'benign', '1': 'malignant', '0.0': 'benign', '1.0': 'malignant'}.get(v, v)
                  for v in values]
    else:
        classes = sorted({v for v in values if v})
    bad = [f'{i} ({v!r})' for i, v in zip(ids, values) if v not in classes]
    if bad:
        raise UserError(f'{file}: {len(bad)} row(s) with an unknown {label} (classes: '
                        f'{" ".join(classes)}): {few(bad)}')
    paths = [os.path.join(folder, i + '.jpg') for i in ids]
    _check_files(paths, file, folder)
    groups = [(r['patient_id'] or '').strip() or i for r, i in zip(rows, ids)]
    labels = [classes.index(v) for v in values]
    return make_dataset('isic2020', root, classes, ids, paths, labels, groups)


# HAM10000: metadata CSV + images split over one or two folders, named in several ways
HAM_CLASSES = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']  # DermaMNIST's label order
_HAM_CSV = 'HAM10000_metadata.csv'


def _detect_ham10000(path):
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, _HAM_CSV))
    return os.path.basename(path) == _HAM_CSV


def _read_ham10000(path, opts):
    file, root = _csv_next_to(path, _HAM_CSV)
    rows = read_csv(file, ['lesion_id', 'image_id', 'dx'])
    # HAM10000_images_part_1/_part_2, part1/part2, HAM10000_images/, lower-case Kaggle copies
    folders = sorted(e.path for e in os.scandir(root)
                     if e.is_dir() and e.name.lower().startswith('ham10000_images'))
    if not folders:
        raise UserError(f'{root}: no image folder (HAM10000_images_part_1/ and _part_2/, '
                        f'or HAM10000_images/) next to {_HAM_CSV}')
    files = {}
    for d in folders:
        for p in _find_images(d):
            files.setdefault(os.path.splitext(os.path.basename(p))[0], p)
    ids = [(r['image_id'] or '').strip() for r in rows]
    dx = [(r['dx'] or '').strip().lower() for r in rows]
    bad = [f'{i} ({d!r})' for i, d in zip(ids, dx) if d not in HAM_CLASSES]
    if bad:
        raise UserError(f'{file}: {len(bad)} row(s) with an unknown dx (classes: '
                        f'{" ".join(HAM_CLASSES)}): {few(bad)}')
    missing = [i for i in ids if i not in files]
    if missing:
        raise UserError(f'{len(missing)} image file(s) listed in {file} are missing from '
                        f'{", ".join(os.path.basename(d) for d in folders)}: {few(missing)}; '
                        f'is the download complete?')
    groups = [(r['lesion_id'] or '').strip() or i for r, i in zip(rows, ids)]
    labels = [HAM_CLASSES.index(d) for d in dx]
    return make_dataset('ham10000', root, HAM_CLASSES, ids, [files[i] for i in ids], labels,
                        groups)


# DermaMNIST (MedMNIST): one .npz with the official train/val/test arrays
DERMA_CLASSES = HAM_CLASSES  # labels 0 akiec ... 6 vasc
_DERMA_RE = re.compile(r'dermamnist(_(\d+))?\.npz', re.I)


def _derma_files(folder):
    return sorted(e.path for e in os.scandir(folder)
                  if e.is_file() and _DERMA_RE.fullmatch(e.name))


def _derma_size(file):
    m = _DERMA_RE.fullmatch(os.path.basename(file))
    return int(m.group(2) or 28) if m else 0  # plain dermamnist.npz holds 28x28 images


def _detect_dermamnist(path):
    if os.path.isdir(path):
        return bool(_derma_files(path))
    return bool(_DERMA_RE.fullmatch(os.path.basename(path)))


def _npy_shape(zf, key):
    """Shape of one array in an .npz from its header alone: the 224 px file holds 1.5 GB."""
    with zf.open(key + '.npy') as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return read(f)[0]


def _read_dermamnist(path, opts):
    file = path
    if os.path.isdir(path):
        found = _derma_files(path)
        if not found:
            raise UserError(f'{path}: no dermamnist.npz or dermamnist_{{64,128,224}}.npz')
        file = max(found, key=_derma_size)  # the sharpest copy; the cache resizes anyway
        if len(found) > 1:
            print0(f'note: {path}: several DermaMNIST files, using {os.path.basename(file)}; '
                  f'pass --data FILE.npz for another')
    file = os.path.abspath(file)
    keys = [f'{p}_{a}' for p in ('train', 'val', 'test') for a in ('images', 'labels')]
    try:
        with zipfile.ZipFile(file) as zf:
            found = {n[:-4] for n in zf.namelist() if n.endswith('.npy')}
            missing = [k for k in keys if k not in found]
            if missing:
                raise UserError(f'{file}: missing array(s) {", ".join(missing)} '
                                f'(found: {", ".join(sorted(found)) or "nothing"})')
            shapes = {p: _npy_shape(zf, f'{p}_images') for p in ('train', 'val', 'test')}
        with np.load(file) as z:  # labels only: small
            ys = {p: np.asarray(z[f'{p}_labels']) for p in ('train', 'val', 'test')}
    except _NPZ_ERRORS as e:
        raise UserError(f'{file}: not a readable .npz ({type(e).__name__}: {e})') from None
    ids, paths, labels, official, bad = [], [], [], [], []
    for p in ('train', 'val', 'test'):
        y, shape = ys[p], shapes[p]
        if y.ndim not in (1, 2) or y.size != len(y) or len(shape) not in (3, 4) or \
                shape[0] != len(y):
            raise UserError(f'{file}: {p}_images {tuple(shape)} and {p}_labels {y.shape} do '
                            f'not match; expected (N,H,W,3) and (N,1)')
        for k, l in enumerate(y.reshape(-1).tolist()):
            ids.append(f'{p}_{k}')
            paths.append(f'{file}:{p}_images:{k}')  # load_image reads 'file.npz:key:index'
            labels.append(l)
            official.append(p)
            if l not in range(len(DERMA_CLASSES)):
                bad.append(f'{p}_{k} ({l})')
    if bad:
        raise UserError(f'{file}: {len(bad)} label(s) outside 0-{len(DERMA_CLASSES) - 1} '
                        f'({" ".join(DERMA_CLASSES)}), an unknown class: {few(bad)}')
    return make_dataset('dermamnist', file, DERMA_CLASSES, ids, paths, labels, None, official)


READERS = {  # format -> (detect, read); 'auto' tries them in this order. The skin formats
    # come before the generic folders: an ISIC 2019 root would pass for a one-class ImageFolder
    'isic2019': (_detect_isic2019, _read_isic2019),
    'isic2020': (_detect_isic2020, _read_isic2020),
    'ham10000': (_detect_ham10000, _read_ham10000),
    'dermamnist': (_detect_dermamnist, _read_dermamnist),
    'imagefolder': (_detect_imagefolder, _read_imagefolder),
    'folder': (_detect_folder, _read_folder),
}


def read_dataset(path, fmt='auto', **opts):
    """Read a dataset from disk; fmt 'auto' picks the first reader whose detect() says yes."""
    if not path or not os.path.exists(path):
        raise UserError(f'--data {path}: no such file or folder')
    if fmt == 'auto':
        fmt = next((name for name, (detect, _) in READERS.items() if detect(path)), None)
        if fmt is None:
            raise UserError(f'--data {path}: cannot tell its format; pass --format '
                            f'({"|".join(READERS)})')
    elif fmt not in READERS:
        raise UserError(f'--format {fmt}: unknown; choose from auto|{"|".join(READERS)}')
    ds = READERS[fmt][1](path, opts)
    if not ds['ids']:
        raise UserError(f'--data {path}: no images found')
    return ds


def load_image(path, draft=None):
    """Decode one image to an RGB PIL image: EXIF orientation applied; grayscale, RGBA,
    palette, CMYK and 16-bit images converted. Raises OSError/ValueError on a bad file.
    draft=S lets a JPEG decode at reduced scale (never below S on the shorter side)."""
    if '.npz:' in path:  # 'file.npz:key:index' (DermaMNIST)
        file, key, k = path.rsplit(':', 2)
        return Image.fromarray(_npz(file, key)[int(k)]).convert('RGB')
    with Image.open(path) as im:
        if draft:  # a no-op for formats other than JPEG
            im.draft('RGB', (draft, draft))
        im.load()  # force the full decode here, so a truncated file fails here
        im = ImageOps.exif_transpose(im)
        if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16/32-bit gray: scale to 8 bits
            a = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if im.mode.startswith('I;16') or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8))
        if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
            im = im.convert('RGBA')
            bg = Image.new('RGBA', im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert('RGB')


_NPZ = {}
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)  # a damaged file


def _npz(file, key):
    """One array of an .npz, loaded once per process (not the whole file). A damaged array
    is one error for the file, not one for each of its images."""
    if (file, key) not in _NPZ:
        try:
            with np.load(file) as z:
                _NPZ[file, key] = z[key]
        except _NPZ_ERRORS as e:
            raise UserError(f'{file}: its {key} array cannot be read ({type(e).__name__}: '
                            f'{e}); the file is damaged: download it again') from None
    return _NPZ[file, key]


# --------------------------------------------------------------------------- splits
# A split is a JSON file made once and reused by every script:
#   {'dataset': root, 'format': str, 'protocol': 'paper'|'random'|'official',
#    'how': {parameters, the rule in words, counts per class per part},
#    'train': [ids], 'val': [ids], 'test': [ids], 'pretrain': [every non-test id],
#    'extra': [folders whose images join the pretrain pool only]}
# Ids within a part follow the dataset's order. A group (lesion, patient) never sits on two
# sides. Groups are stratified by the label of their first labelled image (one lesion, one
# diagnosis). Unlabelled images (label -1) of a labelled dataset never enter train/val/test;
# they join pretrain unless their group is in test.
SPLIT_RULES = {
    'paper': 'groups walked in a seeded random order (numpy default_rng(seed).permutation of '
             'the groups in first-appearance order); a group goes to train while its class '
             'has fewer than per_class images in train (one number for every class, or a '
             "count per class; with one image per group: the paper's rule); of the rest, "
             'about val_fraction of each class (whole groups, same order) goes to val; the '
             'remainder is test. A class left with no test image is refused',
    'random': 'groups in a seeded random order; about test_fraction of each class (whole '
              'groups) goes to test, then about val_fraction of the rest to val, the '
              'remainder to train',
    'official': "the dataset's own train/val/test assignment; seed and fractions unused",
}


# The paper's labelled ISIC 2019 images per class (2,554 in all). Its stated rule (keep an image
# while its class has < 500) cannot give these on the whole set: DF has 239 images, VASC 253,
# so the rule would keep all of them and test on none. These counts keep every class in test
PAPER_PER_CLASS = {'MEL': 500, 'NV': 500, 'BCC': 500, 'AK': 306, 'BKL': 467, 'DF': 55,
                   'VASC': 55, 'SCC': 171}


def per_class_arg(text):
    """An argparse type for the paper rule's per_class: a number for every class (500), a
    count per class (MEL=500,NV=500,...), or 'paper' (PAPER_PER_CLASS)."""
    if text == 'paper':
        return dict(PAPER_PER_CLASS)
    if '=' not in text:
        return number(int, 1)(text)
    out = {}
    for item in text.split(','):
        name, _, n = item.partition('=')
        if not name.strip() or not n.strip().isdigit() or int(n) < 1 or name.strip() in out:
            raise argparse.ArgumentTypeError(
                f'{text}: expected a number, paper, or CLASS=N,... with each class once and '
                f'every N >= 1')
        out[name.strip()] = int(n)
    return out


def _per_class_target(ds, per_class):
    """{class index: images} from per_class (a number, or {class name: images} naming every
    class of ds)."""
    classes = ds['classes']
    if not isinstance(per_class, dict):
        if int(per_class) < 1:
            raise UserError(f'per_class {per_class}: must be at least 1')
        return {c: int(per_class) for c in range(len(classes))}
    unknown = sorted(set(per_class) - set(classes))
    missing = [c for c in classes if c not in per_class]
    if unknown or missing:
        raise UserError(f'per_class {",".join(f"{c}={n}" for c, n in per_class.items())}: '
                        + (f'{few(unknown)} not among the classes of {ds["root"]}; '
                           if unknown else '')
                        + (f'no count for {few(missing)}; ' if missing else '')
                        + f'name each of {" ".join(classes)} once')
    bad = [c for c, n in per_class.items() if not isinstance(n, int) or n < 1]
    if bad:
        raise UserError(f'per_class: {few(bad)} must be whole numbers of at least 1')
    return {classes.index(c): n for c, n in per_class.items()}


def _group_table(ds, ks):
    """Groups among image indices ks in first-appearance order: (names, members, labels)."""
    members = {}
    for k in ks:
        members.setdefault(ds['groups'][k], []).append(k)
    names = list(members)
    labels = [next((ds['labels'][k] for k in members[g] if ds['labels'][k] >= 0), -1)
              for g in names]
    return names, [members[g] for g in names], labels


def _take(order, sizes, labels, target, within=False):
    """The one stratified, group-aware selection of splits and labelled subsets: walk groups
    in order and take a group while its class has fewer than target[c] images; within=True
    takes a group only if it fits in what is left of target[c] (never above it), and a class
    none of whose groups fits gets its first group."""
    taken, out = collections.Counter(), []
    for g in order:
        c = labels[g]
        if (taken[c] + sizes[g] <= target.get(c, 0)) if within else taken[c] < target.get(c, 0):
            out.append(g)
            taken[c] += sizes[g]
    if within:
        out += [next(g for g in order if labels[g] == c) for c in sorted(set(labels) - set(taken))]
    return out


def _fraction_target(order, sizes, labels, fraction):
    n = collections.Counter()
    for g in order:
        n[labels[g]] += sizes[g]
    return {c: round(fraction * m) for c, m in n.items()}


def _class_counts(ds, ks):
    names = ds['classes'] + ['unlabelled']
    counts = collections.Counter(names[ds['labels'][k]] for k in ks)  # -1 -> 'unlabelled'
    return {c: counts[c] for c in names if c in counts or c != 'unlabelled'}


def make_split(ds, protocol, seed=0, per_class=500, test_fraction=0.2, val_fraction=0.1,
               extra=None):
    """Seeded, stratified, group-aware train/val/test split of ds (see SPLIT_RULES)."""
    if protocol not in SPLIT_RULES:
        raise UserError(f'--protocol {protocol}: unknown; choose from {"|".join(SPLIT_RULES)}')
    for name, f in (('test_fraction', test_fraction), ('val_fraction', val_fraction)):
        if not 0 <= f < 1:
            raise UserError(f'{name} {f}: must be in [0, 1)')
    labels, n = ds['labels'], len(ds['ids'])
    labelled = any(l >= 0 for l in labels)
    # the parts draw from labelled images; a dataset without labels is split by group only
    pool = [k for k in range(n) if labels[k] >= 0] if labelled else list(range(n))
    side = [None] * n
    if protocol == 'official':
        if ds['official'] is None:
            raise UserError(f'{ds["root"]}: {ds["format"]} has no official split; use '
                            f'--protocol random or paper')
        odd = sorted({o for o in ds['official'] if o not in ('train', 'val', 'test')})
        if odd:
            raise UserError(f'{ds["root"]}: official split values {few(odd)}; '
                            f'expected train|val|test')
        for k in pool:
            side[k] = ds['official'][k]
    else:
        if protocol == 'paper' and not labelled:
            raise UserError(f'{ds["root"]}: --protocol paper needs labels; this dataset has '
                            f'none (use random)')
        names, members, glabels = _group_table(ds, pool)
        sizes = [len(m) for m in members]
        order = np.random.default_rng(seed).permutation(len(names)).tolist()
        if protocol == 'paper':
            first = _take(order, sizes, glabels, _per_class_target(ds, per_class))
            first_side, rest_side, frac = 'train', 'test', val_fraction
        else:
            first = _take(order, sizes, glabels,
                          _fraction_target(order, sizes, glabels, test_fraction))
            first_side, rest_side, frac = 'test', 'train', val_fraction
        chosen = set(first)
        rest = [g for g in order if g not in chosen]
        val = set(_take(rest, sizes, glabels, _fraction_target(rest, sizes, glabels, frac)))
        for g in order:
            s = first_side if g in chosen else 'val' if g in val else rest_side
            for k in members[g]:
                side[k] = s
    parts = {p: [k for k in range(n) if side[k] == p] for p in ('train', 'val', 'test')}
    if not parts['train']:  # every later script would fail on it, each in its own words
        raise UserError(f'{ds["root"]}: the {protocol} split leaves no image in train (val '
                        f'{len(parts["val"])}, test {len(parts["test"])}); lower the test and '
                        f'val fractions')
    if protocol == 'paper':
        _check_every_class_tested(ds, parts, per_class)
    test_groups = {ds['groups'][k] for k in parts['test']}
    # unlabelled images of a labelled dataset: pretrain only, and never next to a test group
    free = [k for k in range(n) if side[k] is None and ds['groups'][k] not in test_groups
            and not (protocol == 'official' and ds['official'][k] == 'test')]
    pretrain = sorted(parts['train'] + parts['val'] + free)
    extra = [os.path.abspath(p) for p in (extra or [])]
    for p in extra:
        if not os.path.isdir(p):
            raise UserError(f'--extra {p}: no such folder')
    how = {'rule': SPLIT_RULES[protocol], 'seed': seed,
           'per_class': dict(per_class) if isinstance(per_class, dict) else int(per_class),
           'test_fraction': test_fraction, 'val_fraction': val_fraction,
           'group_label': 'a group is stratified by the label of its first labelled image',
           'n_images': n, 'n_groups': len(set(ds['groups'])),
           'counts': {p: _class_counts(ds, ks) for p, ks in parts.items()},
           'pretrain_images': len(pretrain), 'unlabelled_in_pretrain': len(free)}
    ids = ds['ids']
    split = {'dataset': ds['root'], 'format': ds['format'], 'protocol': protocol, 'how': how,
             **{p: [ids[k] for k in ks] for p, ks in parts.items()},
             'pretrain': [ids[k] for k in pretrain], 'extra': extra}
    _check_split(split, ds, f'{protocol} split of {ds["root"]}')
    return split


def _check_every_class_tested(ds, parts, per_class):
    """The paper rule keeps up to per_class images of a class in train: a class with no more
    than that has nothing left to test on, and its test metrics would quietly leave it out."""
    tested = {ds['labels'][k] for k in parts['test']}
    gone = sorted({ds['labels'][k] for k in parts['train']} - tested)
    if gone:
        sizes = collections.Counter(ds['labels'][k] for k in parts['train'] + parts['val'])
        names = [f'{ds["classes"][c]} ({sizes[c]} images)' for c in gone]
        given = (','.join(f'{c}={n}' for c, n in per_class.items())
                 if isinstance(per_class, dict) else per_class)
        raise UserError(f'{ds["root"]}: the paper split at per_class {given} leaves no test '
                        f'image of {", ".join(names)}; give counts below those class sizes '
                        f'(--per-class CLASS=N,...; ISIC 2019 as the paper: --per-class paper)')


def _check_split(split, ds, where):
    """Parts without duplicates, disjoint, train+val inside pretrain; with ds: every id known
    and no group on two sides. Raises UserError naming the offenders."""
    parts = {p: split[p] for p in ('train', 'val', 'test', 'pretrain')}
    for p, xs in parts.items():
        dup = [i for i, c in collections.Counter(xs).items() if c > 1]
        if dup:
            raise UserError(f'{where}: {len(dup)} id(s) twice in {p}: {few(dup)}')
    for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test'), ('pretrain', 'test')):
        both = sorted(set(parts[a]) & set(parts[b]))
        if both:
            raise UserError(f'{where}: {len(both)} id(s) in both {a} and {b}: {few(both)}')
    lost = sorted(set(parts['train'] + parts['val']) - set(parts['pretrain']))
    if lost:
        raise UserError(f'{where}: {len(lost)} train/val id(s) missing from pretrain: '
                        f'{few(lost)}')
    if ds is None:
        return
    k_of = {i: k for k, i in enumerate(ds['ids'])}  # image id -> its place in ds
    unknown = sorted({i for xs in parts.values() for i in xs if i not in k_of})
    if unknown:
        raise UserError(f'{where}: {len(unknown)} id(s) not in {ds["root"]}: {few(unknown)}; '
                        f'was the split made for another dataset?')
    sides = {}
    labelled = set(parts['train'] + parts['val'])
    for p in ('train', 'val', 'test', 'pretrain'):
        for i in parts[p]:
            if p != 'pretrain' or i not in labelled:
                sides.setdefault(ds['groups'][k_of[i]], set()).add(p)
    cross = [f'{g} ({"+".join(sorted(s))})' for g, s in sides.items()
             if len(s - {'pretrain'}) > 1 or {'pretrain', 'test'} <= s]
    if cross:
        raise UserError(f'{where}: {len(cross)} group(s) (lesion/patient) on two sides: '
                        f'{few(cross)}; a group must stay on one side')


def save_split(path, split):
    _check_split(split, None, f'split {path}')
    write_json(path, split)


def load_split(path, ds=None):
    """Read a split JSON; with ds, also check its ids exist and no group crosses sides."""
    split = read_json(path, 'split file')
    need = ['protocol', 'train', 'val', 'test', 'pretrain']
    missing = [k for k in need if not isinstance(split, dict) or k not in split]
    if missing:
        raise UserError(f'split file {path}: missing {", ".join(missing)}; make it again')
    split.setdefault('extra', [])
    _check_split(split, ds, f'split file {path}')
    return split


def split_path(ds, protocol):
    """splits/<dataset>-<protocol>.json; <dataset> is the root's name (an .npz's stem)."""
    return os.path.join('splits', f'{dataset_name(ds)}-{protocol}.json')


def labelled_subset(ds, ids, seed, per_class=None, fraction=None):
    """Stratified, group-aware labelled subset of ids, deterministic per seed.
    per_class=K: whole groups while they fit in K images per class (a class whose groups all
    exceed K gets its first group); fraction=F: about F of each class (whole groups), at
    least one group per class; neither: every labelled id. Unlabelled ids are left out."""
    if per_class is not None and fraction is not None:
        raise UserError('give per_class or fraction, not both')
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f'fraction {fraction}: must be in (0, 1]')
    if per_class is not None and int(per_class) < 1:
        raise UserError(f'per_class {per_class}: must be at least 1')
    k_of = {i: k for k, i in enumerate(ds['ids'])}  # image id -> its place in ds
    unknown = [i for i in ids if i not in k_of]
    if unknown:
        raise UserError(f'{len(unknown)} id(s) not in {ds["root"]}: {few(unknown)}')
    ks = [k_of[i] for i in ids if ds['labels'][k_of[i]] >= 0]
    if not ks:
        raise UserError(f'{ds["root"]}: no labelled images among the {len(ids)} ids given')
    names, members, glabels = _group_table(ds, ks)
    sizes = [len(m) for m in members]
    order = np.random.default_rng(seed).permutation(len(names)).tolist()
    if per_class is not None:
        chosen = _take(order, sizes, glabels, {c: int(per_class) for c in set(glabels)},
                       within=True)
    elif fraction is not None:
        target = _fraction_target(order, sizes, glabels, fraction)
        chosen = _take(order, sizes, glabels, {c: max(1, t) for c, t in target.items()})
    else:
        chosen = order
    keep = {k for g in chosen for k in members[g]}
    return [ds['ids'][k] for k in ks if k in keep]


def pool_subset(ds, ids, fraction, seed=0):
    """About `fraction` of the images ids (a pretraining pool), whole groups (lesions,
    patients) at a time in a seeded order, in ds order: how much unlabelled data further
    pretraining needs. fraction 1 returns ids as they are."""
    if not 0 < fraction <= 1:
        raise UserError(f'--pool-fraction {fraction}: must be in (0, 1]')
    if fraction == 1:
        return list(ids)
    k_of = {i: k for k, i in enumerate(ds['ids'])}
    _, members, _ = _group_table(ds, [k_of[i] for i in ids])
    order = np.random.default_rng(seed).permutation(len(members)).tolist()
    keep, target = set(), round(fraction * len(ids))
    for g in order:
        if len(keep) >= target:
            break
        keep.update(members[g])
    return [i for i in ids if k_of[i] in keep]


# --------------------------------------------------------------------------- uint8 cache
# Each image is decoded once, its shorter side resized to S and centre-cropped to S x S, and
# stored in one memory-mapped (N, S, S, 3) uint8 .npy beside a JSON description, the `cache`
# dict: {'file', 'size', 'ids', 'labels', 'groups', 'classes', 'fingerprint', 'bad'}. Image k
# of the cache (its *position*) is cache['ids'][k]. Training then reads raw bytes: no JPEG
# decoding per epoch. The fingerprint of the source files (path, size, mtime) and of what the
# dataset says about them (classes, labels, groups: a corrected label CSV beside unchanged
# images) makes a changed source rebuild the cache and an unchanged one be reused.

def fingerprint(paths, about=None):
    """sha1 of the files' paths, sizes and mtimes (an .npz member by its archive), and of
    `about` (JSON-able: what the dataset says of them) when given."""
    h = hashlib.sha1()
    for p in dict.fromkeys(p.rsplit('.npz:', 1)[0] + '.npz' if '.npz:' in p else p
                           for p in paths):
        try:
            st = os.stat(p)
            h.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        except FileNotFoundError:
            h.update(f'{p}\0missing\n'.encode())
    h.update('\n'.join(paths).encode())
    if about is not None:
        h.update(b'\0' + json.dumps(about, sort_keys=True).encode())
    return h.hexdigest()


def cache_fingerprint(ds):
    """The fingerprint a cache of ds is reused under: its files and its classes, labels and
    groups (the cache holds those too, and training and scoring read them from it)."""
    return fingerprint(ds['paths'], [ds['classes'], ds['labels'], ds['groups']])


def _decode_resized(path, size):
    """(S, S, 3) uint8: shorter side to `size` (antialiased), centre crop."""
    im = load_image(path, draft=size)  # JPEG DCT-domain downscale: 4000x3000 decodes fast
    return np.asarray(ImageOps.fit(im, (size, size), Image.BICUBIC), dtype=np.uint8)


def _cache_worker(job):
    file, size, start, paths = job
    arr = np.load(file, mmap_mode='r+')
    bad = []
    for k, p in enumerate(paths):
        try:
            arr[start + k] = _decode_resized(p, size)
        except UserError:  # the whole file, not this image (a damaged .npz)
            raise
        except Exception as e:  # noqa: BLE001 -- every decode failure is reported by name
            bad.append((start + k, f'{type(e).__name__}: {e}'))
    arr.flush()
    return len(paths), bad


def _cache_stem(ds, size, cache_dir):
    key = hashlib.sha1(f'{ds["format"]}|{ds["root"]}|{size}'.encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f'{dataset_name(ds)}-{size}-{key}')


def find_cache(ds, size, cache_dir, skip_bad=False, fp=None):
    """The cache dict of a finished cache of ds whose fingerprint matches, else None. A cache
    whose files cannot be read (a damaged description, an array shorter than it says) is
    not an error: it is rebuilt, with a note."""
    stem = _cache_stem(ds, size, cache_dir)
    if not (os.path.exists(stem + '.json') and os.path.exists(stem + '.npy')):
        return None
    try:
        cache = read_json(stem + '.json', 'cache description')
        if not isinstance(cache, dict) or not {'ids', 'labels', 'bad'} <= set(cache):
            raise UserError(f'cache description {stem}.json is not one')
        _check_npy(stem + '.npy', (len(cache['ids']), size, size, 3))
    except UserError as e:
        print0(f'note: {e}; rebuilding the cache')
        return None
    if cache.get('fingerprint') == (fp or cache_fingerprint(ds)) and \
            (skip_bad or not cache['bad']):
        return cache
    return None


def _check_npy(file, shape):
    """Raise UserError unless file is a uint8 .npy of `shape` with all its bytes present."""
    try:
        with open(file, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            got, _, dtype = read(f)
            need = f.tell() + int(np.prod(shape))
    except (OSError, ValueError) as e:
        raise UserError(f'cache array {file} is not readable ({e})')
    if tuple(got) != tuple(shape) or dtype != np.uint8 or os.path.getsize(file) < need:
        raise UserError(f'cache array {file} is damaged or incomplete ({tuple(got)} {dtype}, '
                        f'{os.path.getsize(file)} bytes; expected {tuple(shape)} uint8)')


def build_cache(ds, size, cache_dir='cache', workers=2, skip_bad=False, verbose=True):
    """Decode ds once into cache_dir; reuse when the fingerprint matches. Returns the cache
    dict: {'file', 'size', 'ids', 'labels', 'groups', 'classes', 'fingerprint', 'bad'}."""
    if size < 8:
        raise UserError(f'--cache-size {size}: too small, use at least 8 pixels')
    stem, fp = _cache_stem(ds, size, cache_dir), cache_fingerprint(ds)
    cache = find_cache(ds, size, cache_dir, skip_bad, fp)
    if cache:
        return cache
    n = len(ds['paths'])
    os.makedirs(cache_dir, exist_ok=True)
    if remove_stale_tmp(stem):
        print0(f'note: removed the temporary files of an interrupted build of {stem}.npy')
    tmp = tmp_name(stem, '.tmp.npy')
    np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=(n, size, size, 3)).flush()
    chunk = max(1, min(256, n // (4 * max(1, workers)) or 1))
    jobs = [(tmp, size, s, ds['paths'][s:s + chunk]) for s in range(0, n, chunk)]
    bad, done, t0, last, pool = [], 0, time.time(), 0.0, None
    try:
        if workers > 0 and n > chunk:
            pool = multiprocessing.get_context('fork' if sys.platform == 'linux' else 'spawn').Pool(workers)
            results = pool.imap_unordered(_cache_worker, jobs)
        else:
            pool, results = None, map(_cache_worker, jobs)
        for k, b in results:
            done, bad = done + k, bad + b
            now = time.time()
            if verbose and (now - last > 2 or done == n):
                rate = done / max(now - t0, 1e-9)
                print(f'cache {os.path.basename(stem)}: {done}/{n} images, {rate:.0f} img/s, '
                      f'eta {fmt_time((n - done) / max(rate, 1e-9))}', flush=True)
                last = now
        if pool:
            pool.close()
            pool.join()
        bad.sort()
        bad_list = [{'id': ds['ids'][i], 'path': ds['paths'][i], 'error': e} for i, e in bad]
        if bad and not skip_bad:
            lines = '\n'.join(f'  {r["path"]}: {r["error"]}' for r in bad_list)
            raise UserError(f'{len(bad)} unreadable image(s):\n{lines}\nfix or remove them, '
                            f'or pass --skip-bad to exclude them (they are then recorded in '
                            f'the cache description)')
        keep = sorted(set(range(n)) - {i for i, _ in bad})
        if bad:  # compact: the cache holds readable images only
            src = np.load(tmp, mmap_mode='r')
            tmp2 = tmp_name(stem, '.tmp2.npy')
            dst = np.lib.format.open_memmap(tmp2, 'w+', np.uint8, (len(keep), size, size, 3))
            for s in range(0, len(keep), 1024):
                dst[s:s + 1024] = src[keep[s:s + 1024]]
            dst.flush()
            del src, dst
            os.replace(tmp2, tmp)
        os.replace(tmp, stem + '.npy')
    finally:
        if pool:  # stopped by an error: its workers go too (after close + join, a no-op)
            pool.terminate()
        for t in (tmp, tmp_name(stem, '.tmp2.npy')):
            if os.path.exists(t):
                os.remove(t)
    cache = {'file': stem + '.npy', 'size': size, 'format': ds['format'], 'root': ds['root'],
             'classes': ds['classes'], 'ids': [ds['ids'][i] for i in keep],
             'labels': [ds['labels'][i] for i in keep],
             'groups': [ds['groups'][i] for i in keep], 'fingerprint': fp, 'bad': bad_list}
    write_json(stem + '.json', cache)
    if verbose and bad_list:
        print(f'cache: excluded {len(bad_list)} unreadable image(s) (--skip-bad), listed in '
              f'{stem}.json: {few(r["path"] for r in bad_list)}')
    return cache


def fmt_time(s):
    s = int(s)
    return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


# --------------------------------------------------------------------------- loader
class CachedImages(torch.utils.data.Dataset):
    """The images at `positions` of a uint8 cache, indexed with a list of indices into
    positions (one batch at a time): one sorted fancy read from the memmap instead of B
    Python calls. Returns (B, S, S, 3) uint8 and (B,) int64 labels; the memmap opens lazily
    so worker processes each get their own."""

    def __init__(self, cache, positions):
        self.file, self.positions = cache['file'], np.asarray(positions, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(cache['labels'], dtype=np.int64)[self.positions])
        self.arr = None

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, batch):
        if self.arr is None:
            self.arr = np.load(self.file, mmap_mode='r')
        batch = np.asarray(batch, dtype=np.int64)
        pos = self.positions[batch]
        order = np.argsort(pos, kind='stable')  # sorted reads are sequential on disk
        x = torch.from_numpy(self.arr[pos[order]])
        if (np.diff(order) != 1).any():  # back to the sampler's order (shuffled batches)
            x = x[torch.from_numpy(np.argsort(order))]
        return x, self.labels[torch.from_numpy(batch)]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices for this rank: DistributedSampler's seeded per-epoch order, cut
    into local batches, optionally skipping the first `skip` batches (mid-epoch resume).
    DistributedSampler shuffles with seed + epoch, which gave seed s's epoch e the order of
    seed s+1's epoch e-1: two seeds over the same images shared all their epochs' orders but
    one. The seeds are spread further apart than any run has epochs (MAX_EPOCHS)."""

    def __init__(self, n, batch_size, rank=0, world=1, shuffle=True, seed=0, drop_last=True):
        self.base = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed * 1_000_003,
            drop_last=drop_last)
        self.batch_size, self.drop_last, self.skip = batch_size, drop_last, 0

    def set_epoch(self, epoch, skip=0):
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        idx = list(self.base)
        for b in range(self.skip, len(self)):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self):
        n = len(self.base)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def make_loader(cache, positions, batch_size, rank=0, world=1, shuffle=True, seed=0,
                drop_last=True, workers=2, pin=False):
    """A DataLoader of uint8 batches of the cache images at `positions`; batch_size is per
    rank; pin=True when batches go to a GPU. len(loader) is the steps per epoch; call
    loader.sampler.set_epoch(epoch, skip) before each epoch (fit does)."""
    if not len(positions):  # not a batch size problem: say what is missing
        raise UserError('no images to load: the part is empty, or every image of it was '
                        'excluded as unreadable (--skip-bad)')
    if drop_last and len(positions) < batch_size * world:
        raise UserError(f'{len(positions)} images cannot fill one batch of '
                        f'{batch_size * world}; lower --batch-size')
    sampler = EpochBatches(len(positions), batch_size, rank, world, shuffle, seed, drop_last)
    return torch.utils.data.DataLoader(
        CachedImages(cache, positions), sampler=sampler, batch_size=None, num_workers=workers,
        pin_memory=pin, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_worker_signals)


def _worker_signals(worker_id):
    """In each loader worker: Ctrl-C, or a SIGTERM sent to every process of the job (a
    terminal's process group, a scheduler's kill of the job), is the main process's to act on
    (fit checkpoints and exits at its next check), so the worker keeps serving batches until
    the main process stops it. Left to the defaults, the workers died at once and the main
    process failed with "DataLoader worker exited unexpectedly", saving nothing. A SIGTERM
    from the main process itself (multiprocessing stopping its workers) still ends it."""
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, 'sigwaitinfo'):  # macOS, Windows: SIGTERM as by default
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread and later ones
    parent = os.getppid()

    def watch():  # SIGTERM arrives here only: by sender
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # in this thread:
        os.kill(os.getpid(), signal.SIGTERM)  # die of it (SIG_DFL), as without all this
    threading.Thread(target=watch, daemon=True, name='sigterm-watch').start()


def dataset_name(ds):
    """The dataset's short name: its root folder's (an .npz's stem)."""
    name = os.path.basename(ds['root'].rstrip('/\\'))
    return name[:-4] if name.lower().endswith('.npz') else name


def to_device(batch, device):
    x, y = batch
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, S, S), channels_last
    return x, y.to(device, non_blocking=True)


def prepare_cache(ds, size, cache_dir='cache', workers=2, skip_bad=False):
    """build_cache on the job's rank 0 (dist_info); the other ranks poll for the finished
    cache rather than wait at a barrier, which would time out while a large cache is built
    (if rank 0 fails, torchrun stops them). With many nodes, cache_dir must be on a shared
    filesystem, or build it first with `python common.py cache`."""
    if dist_info()[0] == 0:
        return build_cache(ds, size, cache_dir, workers, skip_bad)
    while True:
        cache = find_cache(ds, size, cache_dir, skip_bad)
        if cache:
            return cache
        time.sleep(2)


def cache_positions(cache, ids):
    """Positions in the cache of ids; ids excluded as unreadable (--skip-bad) are dropped
    with a note."""
    where = {i: k for k, i in enumerate(cache['ids'])}
    positions = [where[i] for i in ids if i in where]
    if len(positions) < len(ids):
        print0(f'note: {len(ids) - len(positions)} image(s) are not in the cache (excluded as '
               f'unreadable) and are skipped')
    return positions


# --------------------------------------------------------------------------- batched augmentations
# A view is a dict of plain values (what a flag can set): probabilities end in `_p`, ranges
# are (lo, hi). draw_params draws every random number of a view per sample on the CPU from a
# torch.Generator (so a seed reproduces a batch bitwise, and the masks are known on the host
# without a device sync); apply_params then transforms the whole batch on its own device with
# tensor ops: crop + flip + rotation as one affine resampling, colour ops as per-sample blends,
# blur as two depthwise convolutions. Operations follow torchvision.transforms.v2 formulas.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VIEW = dict(
    size=224,                   # output side S in pixels
    scale=(1.0, 1.0),           # RandomResizedCrop area fraction; (1, 1) with ratio (1, 1) is
    ratio=(1.0, 1.0),           # the whole (centre square of the) image, i.e. no random crop
    interpolation='bilinear',   # or 'bicubic' (Facebook's ImageNet views): grid_sample's cubic
                                # kernel, a = -0.75 (torchvision with antialias=False); PIL's
                                # and torchvision's antialiased one use a = -0.5, a softer kernel
                                # (up to 0.04 apart here on synthetic skin images)
    antialias=True,             # low-pass first when every crop of the batch is larger than S
    flip_p=0.0,                 # horizontal flip
    rotate_p=0.0, degrees=0.0,  # angle uniform in [-degrees, degrees]; zeros outside the frame
    jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,  # ColorJitter
    gray_p=0.0,
    blur_p=0.0, sigma=(0.1, 2.0),  # kernel side: odd, about 10% of S
    solarize_p=0.0,             # invert pixels >= 0.5 (128 in uint8)
    mean=None, std=None,        # per-channel normalisation, last
)
_RANGES = ('scale', 'ratio', 'sigma')
_PROBS = ('flip_p', 'rotate_p', 'jitter_p', 'gray_p', 'blur_p', 'solarize_p')


def _views(shared, *per_view):
    return [dict(_VIEW, **shared, **v) for v in per_view]


# Every preset normalises with ImageNet statistics: a backbone then sees at fine-tuning and
# probing the inputs it was pretrained on (torchvision's and Facebook's weights included).
# The paper lists no normalisation for its skin views; fastai adds this one itself to a
# pretrained model, which is what we follow.
_NORM = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_RRC = dict(_NORM, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
_SKIN = dict(_NORM, size=256, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3))
AUG_PRESETS = {
    # Facebook barlowtwins main.py: two asymmetric views (blur and solarize differ)
    'barlow_imagenet': _views(
        dict(_RRC, size=224, interpolation='bicubic', flip_p=0.5, jitter_p=0.8, brightness=0.4,
             contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2),
        dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2)),
    # the paper's further-SSL views on skin: milder crops and colours, rotation
    'barlow_skin': _views(
        dict(_SKIN, flip_p=0.5, rotate_p=0.5, degrees=45.0, jitter_p=0.8, brightness=0.24,
             contrast=0.24, saturation=0.12, hue=0.06, gray_p=0.2),
        dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2)),
    # the paper's fine-tuning (and test-time augmentation) view
    'finetune_skin': _views(dict(_SKIN, flip_p=0.25, rotate_p=0.25, degrees=45.0), {}),
    # torchvision's ImageNet classification recipe (crop + flip), for pretrain_supervised.py
    'supervised': _views(dict(_RRC, size=224, flip_p=0.5), {}),
    # the whole image resized to S, nothing random
    'eval': _views(dict(_NORM, size=256), {}),
}


def preset_params(name, size=None, **overrides):
    """The per-view param dicts of preset `name` (2 views for barlow_*, else 1), copied, with
    `size` and any other key set in every view. None values are skipped so unset flags pass
    through; for a one-view change edit the returned dict."""
    if name not in AUG_PRESETS:
        raise UserError(f'unknown augmentation preset {name!r}; choose from '
                        f'{", ".join(AUG_PRESETS)}')
    bad = sorted(set(overrides) - set(_VIEW))
    if bad:
        raise UserError(f'unknown augmentation setting(s) {", ".join(bad)}; choose from '
                        f'{", ".join(_VIEW)}')
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in dict(overrides, size=size).items() if v is not None}
    views = [dict(v, **overrides) for v in AUG_PRESETS[name]]
    for v in views:
        _check_view(v)
    return views


def _check_view(v):
    def need(ok, key, what):
        if not ok:
            raise UserError(f'augmentation setting {key}={v[key]!r}: must be {what}')
    need(isinstance(v['size'], int) and v['size'] >= 8, 'size', 'an integer >= 8')
    for k in _PROBS:
        need(0 <= v[k] <= 1, k, 'a probability in [0, 1]')
    for k in _RANGES:
        need(len(v[k]) == 2 and 0 < v[k][0] <= v[k][1], k, 'two numbers 0 < lo <= hi')
    for k in ('brightness', 'contrast', 'saturation', 'degrees'):
        need(v[k] >= 0, k, '>= 0')
    need(0 <= v['hue'] <= 0.5, 'hue', 'in [0, 0.5]')
    need(v['interpolation'] in ('bilinear', 'bicubic'), 'interpolation', 'bilinear or bicubic')
    for k in ('mean', 'std'):
        need((v['mean'] is None) == (v['std'] is None), k, 'given together with mean/std')
        need(v[k] is None or len(v[k]) == 3, k, 'three numbers (R, G, B)')
    need(v['std'] is None or min(v['std']) > 0, 'std', 'positive')


# --------------------------------------------------------------------------- drawing
def _uniform(g, lo, hi, *shape):
    return torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=g)


def _crops(g, n, height, width, scale, ratio):
    """torchvision RandomResizedCrop.get_params for n images at once: 10 tries of (area,
    log-ratio) per image, the first that fits wins, else the whole image clamped to the ratio
    range, centred. (n, 4) int64 rows of (top, left, h, w)."""
    area = _uniform(g, scale[0], scale[1], n, 10) * (height * width)
    aspect = _uniform(g, math.log(ratio[0]), math.log(ratio[1]), n, 10).exp()
    w = (area * aspect).sqrt().round()  # round half to even, as Python's round
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first True
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    if width / height < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    ok = fits.any(1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    pos = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.where(ok, (pos[:, 0] * (height - h + 1)).floor(), (height - fh) // 2)
    left = torch.where(ok, (pos[:, 1] * (width - w + 1)).floor(), (width - fw) // 2)
    return torch.stack([top, left, h, w], 1).long()


def draw_params(view, n, height, width, generator):
    """Every random number of one view for n images of height x width, drawn on the CPU from
    `generator` in a fixed order. A dict of CPU tensors: per op a (n,) bool mask (applied or
    not) and its per-sample values, plus `order` (4,), the colour-jitter order of this batch
    (0 brightness, 1 contrast, 2 saturation, 3 hue). Inspect or edit it, then apply_params."""
    g, v = generator, view
    d = {'crop': _crops(g, n, height, width, v['scale'], v['ratio'])}
    d['flip'] = torch.rand(n, generator=g) < v['flip_p']
    d['rotate'] = torch.rand(n, generator=g) < v['rotate_p']
    d['angle'] = _uniform(g, -v['degrees'], v['degrees'], n).float()  # degrees
    d['jitter'] = torch.rand(n, generator=g) < v['jitter_p']
    for k in ('brightness', 'contrast', 'saturation'):  # factor 1 = unchanged
        d[k] = _uniform(g, max(0.0, 1 - v[k]), 1 + v[k], n).float()
    d['hue'] = _uniform(g, -v['hue'], v['hue'], n).float()  # fraction of the colour circle
    d['order'] = torch.randperm(4, generator=g)  # per batch (torchvision: per image)
    d['gray'] = torch.rand(n, generator=g) < v['gray_p']
    d['blur'] = torch.rand(n, generator=g) < v['blur_p']
    d['sigma'] = _uniform(g, v['sigma'][0], v['sigma'][1], n).float()  # pixels
    d['solarize'] = torch.rand(n, generator=g) < v['solarize_p']
    return d


def take_params(d, idx):
    """The drawn params of the images idx (an index or slice); the jitter order is per batch."""
    return {k: v if k == 'order' else v[idx] for k, v in d.items()}


# --------------------------------------------------------------------------- applying
_PER_SAMPLE = ('brightness', 'contrast', 'saturation', 'hue', 'sigma')


def _affine(d, height, width):
    """(n, 2, 3) float64 thetas in grid_sample's normalised coordinates (align_corners=False):
    `full` maps output pixels to source pixels through rotate, then flip, then crop (the
    inverse of crop -> flip -> rotate); `rot` is the rotation alone, for the zero fill."""
    top, left, h, w = d['crop'].double().unbind(1)
    rad = torch.where(d['rotate'], d['angle'].double(), 0.0) * (math.pi / 180)
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    # the crop is a scale (w/W, h/H) and a shift to its centre; flip negates x before it
    sx = w / width * torch.where(d['flip'], -1.0, 1.0)
    sy = h / height
    full = torch.stack([sx * cos, -sx * sin, (2 * left + w) / width - 1,
                        sy * sin, sy * cos, (2 * top + h) / height - 1], 1)
    rot = torch.stack([cos, -sin, zero, sin, cos, zero], 1)
    return full.view(-1, 2, 3), rot.view(-1, 2, 3)


def _to_device_async(t, device):
    """A host tensor on `device` without the host waiting for the GPU: pinned first on CUDA
    (a copy from pageable memory may wait), then a non-blocking copy."""
    return (t.pin_memory() if device.type == 'cuda' else t).to(device, non_blocking=True)


def _params_to_device(d, height, width, device):
    """The per-sample values the device needs, in one host-to-device copy that does not wait
    for the GPU (pinned, non_blocking): thetas (n, 2, 3), values (n, 1, 1, 1), float32."""
    n = d['flip'].shape[0]
    full, rot = _affine(d, height, width)
    cols = torch.stack([d[k].double() for k in _PER_SAMPLE], 1)
    buf = _to_device_async(torch.cat([full.view(n, 6), rot.view(n, 6), cols], 1).float(),
                           device)
    p = {'full': buf[:, :6].reshape(n, 2, 3), 'rot': buf[:, 6:12].reshape(n, 2, 3)}
    for i, k in enumerate(_PER_SAMPLE):
        p[k] = buf[:, 12 + i].view(n, 1, 1, 1)
    return p


def _where(y, mask, p, fn):
    """y with fn(y[i], p[i]) at the samples i whose CPU mask (B,) is set, in place; the others
    stay bitwise. Gathering only those samples skips the work of the rest (blur on 10% of a
    view), and the index comes from the host, so nothing waits for the device."""
    if mask.all():
        return fn(y, p)
    idx = _to_device_async(mask.nonzero()[:, 0], y.device)
    # y[idx], not index_select: the latter is ~30x slower on CPU for (B, 3, S, S) rows
    return y.index_copy_(0, idx, fn(y[idx], {k: v[idx] for k, v in p.items()}))


def _grid(theta, size):
    """F.affine_grid(theta, (B, 1, S, S), align_corners=False) as broadcast multiply-adds:
    (B, S, S, 2). Not a bmm, which TF32 (if a script allows it) would round by ~0.1 px."""
    u = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    tx, ty, t0 = (theta[:, :, i].reshape(-1, 1, 1, 2) for i in range(3))  # x, y, 1 columns
    return (u.view(1, 1, size, 1) * tx + t0) + u.view(1, size, 1, 1) * ty


def _resample(x, view, d, p):
    """Crop + flip + rotation as one affine resampling: (B, 3, H, W) -> new (B, 3, S, S)."""
    H, W = x.shape[2:]
    S = view['size']
    h, w = d['crop'][:, 2], d['crop'][:, 3]  # crop sides in source pixels
    rotated = bool((d['rotate'] & (d['angle'] != 0)).any())  # CPU tensors: no device sync
    if S == H == W and not rotated and not d['flip'].any() and (h == H).all() and (w == W).all():
        return x.clone(memory_format=torch.contiguous_format)  # whole image at its own size
    shrink = min(int(h.min()), int(w.min())) / S  # the least downscaled crop of the batch
    if view['antialias'] and round(H / shrink) < H:
        # every crop is downscaled: low-pass the batch once so the smallest crop is about S
        # px (normalised coordinates, hence the thetas, do not change with resolution)
        x = F.interpolate(x, size=(round(H / shrink), round(W / shrink)), mode='bilinear',
                          antialias=True, align_corners=False)
    # border padding: the crop is inside the image, so only edge taps of upscaled crops reach
    # past it, and torchvision's resize clamps those to the edge too
    y = F.grid_sample(x, _grid(p['full'], S), mode=view['interpolation'],
                      padding_mode='border', align_corners=False)
    if view['interpolation'] == 'bicubic':
        y = y.clamp_(0, 1)  # bicubic overshoots at edges; colour ops expect [0, 1]
    y = y.contiguous()
    if rotated:
        y = _where(y, d['rotate'], p, lambda y, q: _zero_fill(y, q['rot']))
    return y


def _zero_fill(y, rot):
    """Zero outside the rotated frame, as torchvision's rotate: y times, per axis, the weight
    of the bilinear taps inside the S x S frame, min(q + 1, S - q) at pixel q = (S v + S - 1)
    / 2 of the rotated normalised coordinate v, i.e. clamp((S + 1) / 2 - S |v| / 2, 0, 1)."""
    S = y.shape[-1]
    inside = _grid(rot, S).abs_().mul_(-S / 2).add_((S + 1) / 2).clamp_(0, 1)  # (B, S, S, 2)
    return y.mul_(inside.prod(-1).unsqueeze(1))


def _hue(y, shift):
    """torchvision adjust_hue per sample, shift (B, 1, 1, 1) in turns: RGB -> HSV as Pillow
    and torchvision, then HSV -> RGB without branches: c = V - V S clamp(2 - |k - 2|, 0, 1),
    k = (6 H + n_c) mod 6 with n = 5, 3, 1 for R, G, B. Returns a new (B, 3, S, S)."""
    r, g, b = y.unbind(1)  # (B, S, S) each
    maxc = torch.maximum(torch.maximum(r, g), b)  # pairwise: aminmax(dim=1) is slow on CPU
    d = torch.minimum(torch.minimum(r, g), b).neg_().add_(maxc)  # max - min = V S
    dd = torch.where(d > 0, d, 1.0)  # grey pixels: any hue, d = 0 zeroes it below
    is_r, is_g = maxc == r, maxc == g
    h6 = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(dd, alpha=2),
                                              (r - g).add_(dd, alpha=4)))
    h6 = h6.div_(dd).unsqueeze(1).add_(shift, alpha=6)  # 6 (H + shift): (B, 1, S, S)
    n = torch.arange(5, 0, -2, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    k = (h6 + n).remainder_(6)
    k.sub_(2).abs_().neg_().add_(2).clamp_(0, 1)  # = clamp(min(k, 4 - k), 0, 1)
    return k.mul_(d.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))


def _jitter(y, view, order, p):
    """ColorJitter with per-sample factors, ops in `order`, in place on y (hue: new tensor);
    each blend clamps to [0, 1] as torchvision's _blend. y.lerp_(a, 1 - f) = f y + (1 - f) a.
    Written out because torchvision's adjust_* take one factor for the whole batch."""
    import torchvision.transforms.v2.functional as TF  # here: see the backbone's note
    for op in order.tolist():
        if op == 0 and view['brightness'] > 0:  # blend with black
            y.mul_(p['brightness']).clamp_(0, 1)
        elif op == 1 and view['contrast'] > 0:  # blend with the mean grey of each image
            y.lerp_(TF.rgb_to_grayscale(y).mean((1, 2, 3), keepdim=True),
                    1 - p['contrast']).clamp_(0, 1)
        elif op == 2 and view['saturation'] > 0:  # blend with the grey image
            y.lerp_(TF.rgb_to_grayscale(y), 1 - p['saturation']).clamp_(0, 1)
        elif op == 3 and view['hue'] > 0:
            y = _hue(y, p['hue'])
    return y


def _blur_kernel_size(size):
    return max(3, 2 * (size // 20) + 1)  # odd, about 10% of the side: 23 at 224 px


def _blur(y, sigma):
    """Gaussian blur with a per-sample sigma (B, 1, 1, 1), reflect padding as torchvision:
    pad once, then a row and a column depthwise convolution over (1, B*3, S, S), one kernel
    per sample and channel. Returns a new (B, 3, S, S)."""
    B, C, H, W = y.shape
    k = _blur_kernel_size(H)
    half = (k - 1) / (2 * math.sqrt(2))  # torchvision's taps: softmax(-(t / sigma)^2)
    t = torch.linspace(-half, half, k, device=y.device, dtype=y.dtype)
    kern = torch.softmax(-(t / sigma.view(B, 1)) ** 2, 1).repeat_interleave(C, 0)  # (B*C, k)
    z = F.pad(y.reshape(1, B * C, H, W), (k // 2,) * 4, mode='reflect')
    z = F.conv2d(z, kern.view(B * C, 1, 1, k), groups=B * C)  # rows: (1, B*C, H + k - 1, W)
    return F.conv2d(z, kern.view(B * C, 1, k, 1), groups=B * C).view(B, C, H, W)


@torch.no_grad()
def apply_params(x, view, d):
    """One view with drawn params `d` on a float batch x (B, 3, H, W) in [0, 1] on any device
    -> new float32 (B, 3, S, S), channels_last."""
    import torchvision.transforms.v2.functional as TF  # here: see the backbone's note
    H, W = x.shape[2:]
    with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a training step
        p = _params_to_device(d, H, W, x.device)
        y = _resample(x, view, d, p)  # new, contiguous: the ops below work in place
        if d['jitter'].any():
            y = _where(y, d['jitter'], p, lambda y, q: _jitter(y, view, d['order'], q))
        if d['gray'].any():
            gray = lambda y, q: y.copy_(TF.rgb_to_grayscale(y, num_output_channels=3))
            y = _where(y, d['gray'], p, gray)
        if d['blur'].any():
            y = _where(y, d['blur'], p, lambda y, q: _blur(y, q['sigma']))
        if d['solarize'].any():
            y = _where(y, d['solarize'], p, lambda y, q: TF.solarize(y, 0.5))
        # not TF.normalize: it copies mean and std to the device on every call, a blocking
        # host-to-device copy on CUDA; Python scalars need none
        if view['mean'] is not None:
            for c in range(3):
                y[:, c].sub_(view['mean'][c]).div_(view['std'][c])
        return y.contiguous(memory_format=torch.channels_last)


def _as_float(x):
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f'augment wants a (B, 3, H, W) batch, got shape {tuple(x.shape)}')
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def augment(x, view, generator):
    """One augmented view of a uint8 (0..255) or float ([0, 1]) batch (B, 3, H, W) on any
    device -> float32 (B, 3, S, S), channels_last. `view` is one dict of preset_params;
    generator None draws from torch's global CPU RNG (fine for the eval view: nothing random)."""
    return apply_params(_as_float(x), view, draw_params(view, x.shape[0], x.shape[2],
                                                        x.shape[3], generator))


def augment_views(x, views, generator):
    """One augmented batch per view (a list of view dicts, or a preset name at its default
    size), converting x to float once: y1, y2 = augment_views(x, views, gen)."""
    views = preset_params(views) if isinstance(views, str) else views
    x = _as_float(x)
    return [apply_params(x, v, draw_params(v, x.shape[0], x.shape[2], x.shape[3], generator))
            for v in views]


# --------------------------------------------------------------------------- command line
# The flags every script spells the same way, in small groups that each script
# combines: a script has exactly the flags it uses, so a flag it would ignore is an error.
# Numeric flags carry their range in their type: a bad value stops before any work.

MAX_SIDE = 4096  # pixels: --size and --cache-size (a 4096 px cache of 25k images is 1.2 TB)
MAX_SEED = 2**31 - 1  # seeds feed torch.manual_seed and numpy, and are mixed into step seeds
MAX_EPOCHS = 100_000  # any epoch count, warmups included: epochs x steps stays an integer
MAX_LR = 100.0  # per 256 images; lr x batch / 256 must stay a float32 (1e308 overflows)


def number(kind=int, lo=None, hi=None, auto=False):
    """An argparse type: kind(text) within [lo, hi] (finite for floats); auto=True also
    accepts the word 'auto'."""
    def parse(text):
        if auto and text == 'auto':
            return text
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (lo is not None and value < lo) or \
                (hi is not None and value > hi):
            what = 'an integer' if kind is int else 'a finite number'
            bounds = '' if lo is None else f' >= {lo}' if hi is None else f' in [{lo}, {hi}]'
            raise argparse.ArgumentTypeError(f'{text}: expected {what}{bounds}'
                                             + (' or auto' if auto else ''))
        return value
    return parse


def default_workers():
    """Loader processes per rank that fit this machine: the cores this process may use,
    shared by the ranks torchrun starts on this node, less one for the training process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(0, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1))


def add_data_args(p, size=224, cache_size=256, split=True):
    g = p.add_argument_group('data')
    g.add_argument('--data', required=True, help='dataset root, folder or file')
    g.add_argument('--format', default='auto', choices=['auto'] + list(READERS),
                   help='the on-disk layout; auto detects it')
    if split:
        g.add_argument('--split', default=None,
                       help='split JSON, made once by `python common.py split`')
    g.add_argument('--size', type=number(int, 8, MAX_SIDE), default=size,
                   help='training resolution (pixels)')
    g.add_argument('--cache-size', type=number(int, 8, MAX_SIDE), default=cache_size,
                   help='side of the cached square images; a bit above --size leaves room '
                        'for crops')
    g.add_argument('--cache-dir', default='cache', help='where decoded uint8 caches live')
    g.add_argument('--skip-bad', action='store_true',
                   help='exclude unreadable images (recorded in the cache description) '
                        'instead of stopping')
    return g


def add_model_args(p, arch='resnet50'):
    g = p.add_argument_group('model')
    g.add_argument('--arch', default=arch, choices=list(ARCHS),
                   help='backbone; resnet18/34 for small runs')
    g.add_argument('--init', default='random',
                   help=f'random | {" | ".join(sorted({n for n, _ in NAMED_WEIGHTS}))} | PATH '
                        f'to a checkpoint or run folder')
    g.add_argument('--offline', action='store_true',
                   help='never download named weights; say where to place them instead')
    return g


def add_runtime_args(p):
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    g.add_argument('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
                   help='auto: bf16 autocast on CUDA, fp32 on CPU')
    g.add_argument('--workers', type=number(int, 0, 256), default=default_workers(),
                   help='loader and cache-build processes per rank (0: in the main process; '
                        'default: the cores of this machine less one, per rank)')
    return g


def add_train_args(p, epochs=1, batch_size=256, lr=0.1, lr_auto=False, out=None, seed=True):
    """Training flags; seed=False for scripts that repeat over --seeds instead."""
    g = p.add_argument_group('training')
    g.add_argument('--out', default=out, required=out is None,
                   help='run folder (resumes if it has ckpt.pt)')
    g.add_argument('--epochs', type=number(int, 1, MAX_EPOCHS), default=epochs)
    g.add_argument('--max-steps', type=number(int, 0), default=0,
                   help='stop after this many steps (0: no limit); for smoke runs')
    g.add_argument('--batch-size', type=number(int, 2), default=batch_size,
                   help='global batch, split evenly over ranks (BatchNorm needs 2+ per rank)')
    g.add_argument('--lr', type=number(float, 1e-12, MAX_LR, auto=lr_auto), default=lr,
                   help='peak learning rate per 256 images'
                        + (', or auto: a short range test picks it' if lr_auto else ''))
    if seed:
        g.add_argument('--seed', type=number(int, 0, MAX_SEED), default=0)
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--log-every', type=number(int, 1), default=10,
                   help='steps between log lines (and the loss and stop checks)')
    g.add_argument('--ckpt-every', type=number(int, 0), default=0,
                   help='steps between checkpoints (0: only by time and at the end)')
    g.add_argument('--ckpt-minutes', type=number(float, 0), default=10.0,
                   help='minutes between checkpoints')
    g.add_argument('--nan-at-step', type=int, default=-1, help=argparse.SUPPRESS)  # tests
    return g


def add_eval_args(p, budgets=False):
    """Flags shared by finetune.py and probe.py. budgets=True: --labels-per-class and
    --label-fraction take one or more values (a list, each value its own rows)."""
    g = p.add_argument_group('evaluation')
    many = dict(nargs='+') if budgets else {}
    each = ' (one or more: each its own rows)' if budgets else ''
    g.add_argument('--protocol', default='random', choices=list(SPLIT_RULES),
                   help='split rule when no --split file is given (made once, then reused)')
    g.add_argument('--labels-per-class', type=number(int, 1), default=None, **many,
                   help='labelled images per class drawn from the train part, per seed' + each)
    g.add_argument('--label-fraction', type=number(float, 1e-9, 1), default=None, **many,
                   help='fraction of each class of the train part, per seed' + each)
    g.add_argument('--seeds', type=parse_seeds, default=[0],
                   help='repeats, e.g. 0-4 or 0,3,7; finished seeds are skipped')
    g.add_argument('--parallel', default='none', choices=['none', 'seeds'],
                   help='under torchrun: none, every seed uses all ranks (DDP); seeds, each '
                        'rank runs its own seeds on its own device, no DDP between them '
                        '(the fast way through many seeds; more ranks than GPUs share them)')
    g.add_argument('--init-name', default=None,
                   help='name of this initialisation in the results table (default: --init)')
    g.add_argument('--results', default='results/results.jsonl', help='one row per seed')
    return g


def parse_args(p, presets=None, argv=None):
    """Parse; with --preset NAME the preset's values become the defaults (explicit flags win).
    Then check what spans two flags."""
    args, _ = p.parse_known_args(argv)
    if presets and getattr(args, 'preset', None):
        p.set_defaults(**presets[args.preset])
    args = p.parse_args(argv)
    if hasattr(args, 'cache_size') and args.cache_size < args.size:
        p.error(f'--cache-size {args.cache_size}: must be >= --size {args.size}')
    if getattr(args, 'labels_per_class', None) and getattr(args, 'label_fraction', None):
        p.error('give --labels-per-class or --label-fraction, not both')
    return args


def parse_seeds(text):
    """'0-4' -> [0, 1, 2, 3, 4]; '1,3,5' -> [1, 3, 5] (an argparse type)."""
    try:
        out = []
        for part in str(text).split(','):
            a, _, b = part.partition('-')
            a, b = int(a), int(b) if b else int(a)
            if not 0 <= a <= b <= MAX_SEED or b - a >= 10_000 or len(out) >= 10_000:
                raise ValueError  # a typo like 0-40000000 must not build a huge list
            out += range(a, b + 1)
        return list(dict.fromkeys(out))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text}: expected a range like 0-4 or a list like '
                                         f'0,2,7 of at most 10000 seeds in [0, {MAX_SEED}]')


# --------------------------------------------------------------------------- runtime
def dist_info():
    """(rank, local_rank, world) of this process: torch.distributed's once it is set up,
    else torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), else (0, 0, 1). The one
    source of rank and world for the runtime, print0 and the losses."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get('LOCAL_RANK', 0)), dist.get_world_size()
    return (int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0)),
            int(os.environ.get('WORLD_SIZE', 1)))


def setup_runtime(device='auto', precision='auto', seed=0, parallel_seeds=False):
    """Device, distributed (detected from torchrun's environment), precision, seed.
    Returns a namespace: device, rank, local_rank, world, is_main, dtype (autocast),
    precision ('bf16' | 'fp16' | 'fp32'), seed_rank and seed_ranks.
    parallel_seeds=True under torchrun: every process is a runtime of its own (world 1, no
    process group, no DDP) on GPU local_rank modulo the GPUs visible, so more processes than
    GPUs share them, and seed_rank / seed_ranks say which share of the seeds it runs
    (seeds_of); without torchrun it changes nothing. Under DDP each rank needs a GPU of its
    own."""
    rank, local_rank, world = dist_info()
    seed_rank, seed_ranks = (rank, world) if parallel_seeds else (0, 1)
    if parallel_seeds:
        rank, world = 0, 1
    cuda = torch.cuda.is_available() if device == 'auto' else device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is visible; use --device cpu')
    gpu = local_rank
    if cuda and local_rank >= torch.cuda.device_count():
        if not parallel_seeds:
            raise UserError(f'local rank {local_rank}, but {torch.cuda.device_count()} GPU(s) '
                            f'are visible: start at most that many processes a node '
                            f'(--nproc_per_node), or run the seeds apart (--parallel seeds)')
        gpu = local_rank % torch.cuda.device_count()
    dev = torch.device(f'cuda:{gpu}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(dev)
        # TF32 for convolutions (they run in bf16 under the default autocast anyway); matrix
        # products keep torch's default, full fp32: the ones in fp32 under autocast are the
        # ones meant to be (the Barlow Twins cross-correlation and loss, the probe's fits),
        # and TF32 would round their inputs to 10 bits of mantissa
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo', device_id=dev if cuda else None)
    prec = precision if precision != 'auto' else ('bf16' if cuda else 'fp32')
    if prec in ('bf16', 'fp16') and not cuda:
        print0(f'note: --precision {prec} on CPU; autocast on CPU is slow, fp32 is the default')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[prec]
    torch.manual_seed(seed)
    return types.SimpleNamespace(device=dev, rank=rank, local_rank=local_rank, world=world,
                                 is_main=rank == 0, dtype=dtype, precision=prec,
                                 seed_rank=seed_rank, seed_ranks=seed_ranks, settled=False)


def seeds_of(rt, seeds):
    """This process's share of the seeds: all of them, or under parallel_seeds every
    seed_ranks-th one from seed_rank on (dealt in turn: the load is even, and every process
    computes the same deal without talking to the others)."""
    return list(seeds)[rt.seed_rank::rt.seed_ranks]


def share(rt, rows, seeds):
    """The rows (pending_rows of every seed) of this process's seeds: seeds_of dealt from the
    command's `seeds`, whichever of them are done. The scripts keep the whole list to know
    whether rank 0 must build the cache that the other ranks wait for, though its own
    share is done."""
    mine = set(seeds_of(rt, seeds))
    return [r for r in rows if r['seed'] in mine]


def local_batch(batch_size, world, least=2):
    """The per-rank share of a global batch; it must divide evenly and leave each rank at
    least `least` images (BatchNorm cannot train on one: its variance is 0/0)."""
    if batch_size % world:
        raise UserError(f'--batch-size {batch_size} does not divide by {world} ranks')
    if batch_size // world < least:
        raise UserError(f'--batch-size {batch_size} leaves {batch_size // world} image(s) per '
                        f'rank on {world} rank(s); BatchNorm needs at least {least} per rank')
    return batch_size // world


def teardown(rt, wait=True):
    """A command's end on every rank: under DDP the ranks leave the process group together;
    under parallel_seeds each waits for the others (settle), if run_seeds has not, unless
    wait=False (stopped by a signal: the others are stopped too, or carry on alone)."""
    if rt.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if wait:
        settle(rt)


def settle(rt, poll=0.5, timeout_s=60):
    """Under parallel_seeds, once per command: sign in as done on the launcher's key-value
    store (torchrun's, at MASTER_ADDR:MASTER_PORT; no process group, which would join the
    seeds' losses) and wait until every seed rank has. torchrun stops every rank as soon as
    one exits non-zero, so a rank must not fail before the others have run their seeds.
    Rank 0 leaves last: without torchrun's agent it hosts the store. Polled, so a signal
    still ends the wait; a launcher gone (killed: its ranks live on in sessions of their own)
    ends it with an error, each call to its store giving up after timeout_s (2 ranks of a
    killed launcher exited 155 s later; without the timeout, 30 minutes a call)."""
    if rt.seed_ranks == 1 or rt.settled:
        return
    rt.settled = True
    store, _, _ = next(dist.rendezvous('env://', rt.seed_rank, rt.seed_ranks,
                                       timeout=datetime.timedelta(seconds=timeout_s)))
    store = dist.PrefixStore('parallel-seeds/', store)

    def all_of(what):
        keys = [f'{what}/{r}' for r in range(rt.seed_ranks)]
        while not store.check(keys):
            time.sleep(poll)
    store.set(f'done/{rt.seed_rank}', '1')
    all_of('done')
    store.set(f'left/{rt.seed_rank}', '1')
    if rt.seed_rank == 0:
        all_of('left')


def print0(*a, **k):
    if dist_info()[0] == 0:
        print(*a, **k, flush=True)


# --------------------------------------------------------------------------- backbone, weights
# torchvision is imported where a backbone is made or an image augmented, not at the top:
# its import costs 4.4 s of the 8.6 s `import common` took on this project's 2-core machine
# (its ops pull in torch._dynamo), which every process paid, a bad flag's error message and
# `python common.py split` included. A training process pays torch._dynamo's share anyway
# (torch.optim's optimizers import it): about 7.6 s of imports in all.
ARCHS = {'resnet50': 2048, 'resnet34': 512, 'resnet18': 512, 'resnet10': 512}  # -> feature width


@functools.lru_cache(maxsize=None)
def _live_taps(n, k, stride, pad, dilation):
    """The first and last kernel taps (along one axis of n inputs) that read an input rather
    than zero padding for some output, and the padding (negative: a crop) before and after
    the input that the kernel cut to those taps needs to give the same outputs."""
    outputs = (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    live = [i for i in range(k)
            if any(0 <= o * stride - pad + i * dilation < n for o in range(outputs))]
    if not live:  # every output reads padding alone: nothing to gain, keep the kernel
        return 0, k - 1, pad, pad
    first, last = live[0], live[-1]
    end = (outputs - 1) * stride - pad + last * dilation  # the last input the cut kernel reads
    return first, last, pad - first * dilation, end - (n - 1)


MATMUL_PIXELS = 4  # Conv2d: maps this small are one matrix product


@functools.lru_cache(maxsize=None)
def _matmul_plan(h, w, kernel, stride, pad, dilation, device):
    """A convolution of an h x w map written as one matrix product: ((ho, wo), read, taps,
    index, zero). read: the input pixels some output reads, taps: the kernel taps used (each
    None when all are); index: for each (read pixel q, output pixel p) pair, q-major, the
    position of its tap among those, len(taps) where none joins them (a zero block, zero)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    tap = {}
    for p in range(ho * wo):
        for q in range(h * w):
            (tr, rr), (tc, rc) = (divmod(q // w + ph - p // wo * sh, dh),
                                  divmod(q % w + pw - p % wo * sw, dw))
            if rr == rc == 0 and 0 <= tr < kh and 0 <= tc < kw:
                tap[q, p] = tr * kw + tc
    read = sorted({q for q, _ in tap})
    taps = sorted(set(tap.values()))
    index = [taps.index(tap[q, p]) if (q, p) in tap else len(taps)
             for q in read for p in range(ho * wo)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    return ((ho, wo), None if len(read) == h * w else as_tensor(read),
            None if len(taps) == kh * kw else as_tensor(taps), as_tensor(index),
            len(taps) in index)


def _matmul_conv(x, weight, bias, plan):
    """F.conv2d (groups 1, zero padding) as x (B, Q*C) @ M (Q*C, P*O), where block (q, p) of M
    is the weight's tap that joins input pixel q to output pixel p (or zeros). Returns the
    output as a channels-last view, which the next layer on a small map reads without a copy."""
    (ho, wo), read, taps, index, zero = plan
    b, c, o = x.shape[0], x.shape[1], weight.shape[0]
    xq = x.permute(0, 2, 3, 1).reshape(b, -1, c)  # (B, H*W, C): a view when channels-last
    if read is not None:
        xq = xq[:, read]
    wt = weight.flatten(2)
    if taps is not None:
        wt = wt[:, :, taps]
    wt = wt.permute(2, 1, 0)  # (taps, C, O)
    if zero:
        wt = torch.cat([wt, wt.new_zeros(1, c, o)])
    q, p = xq.shape[1], ho * wo
    m = wt[index].view(q, p, c, o).transpose(1, 2).reshape(q * c, p * o)
    y = xq.reshape(b, q * c) @ m
    if bias is not None:
        y = y + bias.to(y.dtype).repeat(p)  # under autocast y is bf16, as F.conv2d's output
    return y.view(b, ho, wo, o).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """make_backbone's convolutions: nn.Conv2d computing only what reads the input (same
    weights, state dict, outputs and gradients, up to float rounding: tests/test_backbone.py).
    - A map of at most MATMUL_PIXELS pixels (a ResNet's last two stages at 32 px, 2x2 and 1x1;
      its last stage at 64 px, 2x2) goes through one matrix product (_matmul_conv) instead
      of oneDNN's convolution, whose backward is slow on such maps: a 3x3 convolution of 256
      channels on 2x2 maps took 31 ms forward and backward at batch 64, one thread of this
      project's 2-core AMD EPYC, where its matrix product does 67 M multiply-adds per pass
      at about 30 G/s.
    - Otherwise the kernel taps that read only zero padding for the input at hand are left
      out (the taps left out multiply zeros; their weight gradient is zero either way). From
      96 px on, every map of a ResNet has 3 or more pixels a side and every tap is used:
      nothing changes there (224 px on a GPU included).
    A Barlow Twins step of a ResNet-18 at 32 px (batch 64, two views, LARS, one thread) took
    477 ms against 567 with every map through oneDNN (best of 24 steps each, interleaved;
    `tests/bench.py --only step` measures the training step both ways)."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != 'zeros' or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        h, w = x.shape[-2:]
        if h * w <= MATMUL_PIXELS and self.groups == 1:
            return _matmul_conv(x, weight, bias, _matmul_plan(
                h, w, self.kernel_size, self.stride, self.padding, self.dilation, x.device))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        r0, r1, top, bottom = _live_taps(h, kh, sh, self.padding[0], self.dilation[0])
        c0, c1, left, right = _live_taps(w, kw, sw, self.padding[1], self.dilation[1])
        if (r0, r1, c0, c1) == (0, kh - 1, 0, kw - 1):
            return super()._conv_forward(x, weight, bias)
        x = F.pad(x, (left, right, top, bottom))  # negative entries crop
        return F.conv2d(x, weight[:, :, r0:r1 + 1, c0:c1 + 1], bias, self.stride, 0,
                        self.dilation, self.groups)


# --init name -> (arch, url); the file is looked up in the torch hub cache. torchvision's are
# its ResNet*_Weights.IMAGENET1K_V2 (50) and _V1 (18, 34) urls (tests/test_backbone.py checks)
NAMED_WEIGHTS = {
    ('torchvision', 'resnet50'): 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth',
    ('torchvision', 'resnet34'): 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    ('torchvision', 'resnet18'): 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    ('barlowtwins', 'resnet50'): 'https://dl.fbaipublicfiles.com/barlowtwins/'
                                 'ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth',
    ('vicreg', 'resnet50'): 'https://dl.fbaipublicfiles.com/vicreg/resnet50.pth',
}
# file names in the hub cache where the URL's own would collide: Facebook's Barlow Twins and
# VICReg files are both called resnet50.pth, and torch.hub.load of either repository saves it
# as such, so a resnet50.pth found there may be either: it is never taken for one of them
HUB_NAMES = {('barlowtwins', 'resnet50'): 'barlowtwins_resnet50.pth',
             ('vicreg', 'resnet50'): 'vicreg_resnet50.pth'}


def make_backbone(arch):
    """torchvision ResNet with zero-initialised residual BN, classifier replaced by identity,
    its convolutions Conv2d above (same weights and state dict). Returns (model, width).
    resnet10 is ResNet-18 with one basic block per stage instead of two (no published
    weights): half its compute, for CPU runs (`make all`'s default; its training step ran at
    1.7x ResNet-18's images/s at 32 px on this project's 2-core machine, tests/bench.py --only
    step)."""
    import torchvision  # here, not at the top: see the note above
    if arch == 'resnet10':
        m = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                             zero_init_residual=True)
    else:
        m = getattr(torchvision.models, arch)(zero_init_residual=True)
    for conv in m.modules():
        if type(conv) is nn.Conv2d:
            conv.__class__ = Conv2d
    m.fc = nn.Identity()
    return m, ARCHS[arch]


def _guess_arch(keys):
    """The --arch choice whose state dict has these keys' shape (blocks in layer3, bottleneck
    or basic blocks), else None."""
    blocks = len({k.split('.')[1] for k in keys if k.startswith('layer3.')})
    bottleneck = any('.conv3.' in k for k in keys)
    return {(False, 1): 'resnet10', (False, 2): 'resnet18', (False, 6): 'resnet34',
            (True, 6): 'resnet50'}.get((bottleneck, blocks))


def clean_state_dict(obj, source='checkpoint'):
    """A backbone state dict from any of the checkpoint shapes people have: our backbone.pt
    and ckpt.pt, torchvision files, Facebook's resnet50.pth and full checkpoint.pth, DDP
    `module.`, compiled `_orig_mod.`, and `backbone.` / `encoder.` prefixed models."""
    for key in ('model', 'state_dict', 'backbone'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f'{source}: not a state dict of tensors')
    sd = {}
    for k, v in obj.items():
        for prefix in ('module.', '_orig_mod.'):
            k = k.replace(prefix, '')
        sd[k] = v
    for prefix in ('backbone.', 'encoder.'):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return sd


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain values only, never code."""
    if not os.path.isfile(path):
        raise UserError(f'--init {path}: no such file '
                        '(random | torchvision | barlowtwins | vicreg | PATH)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL' not in str(e):  # no blocked import: bytes that are not a pickle at all
            raise UserError(f'{path}: not a readable PyTorch checkpoint (damaged, or another '
                            f'kind of file)')
        # PyTorch's message opens with generic advice (including to retry with
        # weights_only=False); the reason is the first line after it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        boiler = ('Weights only load failed', 'Please file an issue', 'Check the documentation')
        why = next((ln for ln in lines if not ln.startswith(boiler)), '')
        raise UserError(f'{path}: refused: it holds more than tensors and plain values '
                        f'(weights_only load failed: {why[:160]})')
    except Exception as e:  # noqa: BLE001 -- corrupt or foreign files
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: '
                        f'{str(e)[:160]})')


def hub_file(url, offline=False, name=None):
    """The torch hub cache path for url ($TORCH_HOME/hub/checkpoints/NAME, NAME the URL's
    file name unless given); downloaded when absent unless offline."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name or os.path.basename(url))
    if os.path.isfile(path):
        return path
    hint = f'place {os.path.basename(url)} from {url} at {path}'
    if name and os.path.isfile(os.path.join(os.path.dirname(path), os.path.basename(url))):
        hint += (f' (the {os.path.basename(url)} there is not used: other weights are saved '
                 f'under that name too)')
    if offline:
        raise UserError(f'named weights not found: {hint}')
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print0(f'downloading {url} -> {path}')
        torch.hub.download_url_to_file(url, path, progress=False)
    except Exception as e:  # noqa: BLE001 -- offline machines end up here
        raise UserError(f'could not download named weights ({type(e).__name__}); {hint}')
    return path


def init_file(init):
    """--init PATH: a checkpoint file, or a run folder holding backbone.pt."""
    folder = os.path.join(init, 'backbone.pt')
    return folder if os.path.isdir(init) and os.path.isfile(folder) else init


def load_backbone(model, arch, init, offline=False):
    """Load --init into a backbone made by make_backbone; only a classifier head (fc.*) may be
    missing or extra, anything else is refused naming the keys. Returns a short description."""
    if init == 'random':
        return 'random'
    if init in {name for name, _ in NAMED_WEIGHTS}:
        if (init, arch) not in NAMED_WEIGHTS:
            raise UserError(f'--init {init}: no published {arch} weights; use --arch resnet50')
        path = hub_file(NAMED_WEIGHTS[init, arch], offline, HUB_NAMES.get((init, arch)))
    else:
        path = init_file(init)
    sd = clean_state_dict(load_checkpoint(path), path)
    own = model.state_dict()
    head = lambda k: k.startswith('fc.')
    optional = lambda k: head(k) or k.endswith('num_batches_tracked')  # absent in old files
    missing = [k for k in own if k not in sd and not optional(k)]
    extra = [k for k in sd if k not in own and not head(k)]
    shape = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or shape:
        guess = _guess_arch(sd)
        why = (f'it looks like a {guess}, pass --arch {guess}' if guess and guess != arch
               else f'missing {few(missing, 3) or "none"}; unexpected {few(extra, 3) or "none"}'
                    f'; wrong shape {few(shape, 3) or "none"}')
        raise UserError(f'{path} does not fit a {arch} backbone: {why}')
    model.load_state_dict({k: v for k, v in sd.items() if not head(k)}, strict=False)
    return path


def state_fingerprint(sd):
    """sha1 over a state dict's names and bytes: tells two backbones apart in results."""
    h = hashlib.sha1()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- Barlow Twins
def make_projector(width, spec):
    """'8192-8192-8192' -> Linear(no bias) with BN+ReLU between, as Facebook's."""
    try:
        sizes = [width] + [int(s) for s in spec.split('-')]
        assert all(s > 0 for s in sizes)
    except (ValueError, AssertionError):
        raise UserError(f'--projector {spec}: expected widths like 8192-8192-8192')
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def _world():
    """The ranks the losses reduce over: the process group's, 1 when there is none (one
    process, or one runtime per process under parallel_seeds)."""
    return dist_info()[2] if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t):
    """Sum over ranks, autograd-aware (its backward sums the gradients too); identity alone."""
    return dist_nn.all_reduce(t) if _world() > 1 else t


def _all_gather(t):
    """Concatenation of every rank's t (equal shapes), autograd-aware; identity alone."""
    return torch.cat(dist_nn.all_gather(t)) if _world() > 1 else t


def barlow_loss(z1, z2, lambd=0.0051, eps=1e-5, parts=False):
    """Barlow Twins loss on the global batch, in fp32 whatever the autocast dtype.
    z1, z2: (B, D) local embeddings of the two views, B equal on every rank. Each view is
    batch-normalised without affine parameters over the GLOBAL batch of N (biased variance, as
    BatchNorm1d), then C = z1n^T z2n / N and loss = sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2.

    sum_{i!=j} C_ij^2 = ||C||_F^2 - sum_i C_ii^2, and ||C||_F^2 = sum(G1 * G2) / N^2 with the
    (N, N) Gram matrices G = zn zn^T: O(N^2 D) work instead of O(B D^2). Each rank takes the
    cheaper of the two (the Gram path needs the whole batch gathered); the (D, D) path never
    materialises the Gram matrices and the Gram path never materialises C.
    Every cross-rank sum goes through the autograd-aware collectives, so with DDP's gradient
    averaging the gradients equal those of one process on the whole batch (Facebook's
    version uses a plain all_reduce and gets them scaled by 1/world_size).

    parts=True returns (loss, parts): the invariance term sum_i (1 - C_ii)^2 (loss_inv) and
    the redundancy term lambd * sum_{i!=j} C_ij^2 (loss_red), detached, and both divided by
    D (inv_per_dim, red_per_dim) so that runs of different projector widths compare."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        (b, d), n = z1.shape, z1.shape[0] * _world()

        def whiten(z):  # (B, D) -> (B, D) zero mean, unit variance over the global batch
            mean = _all_reduce(z.sum(0)) / n
            z = z - mean
            var = _all_reduce(z.pow(2).sum(0)) / n
            return z / torch.sqrt(var + eps)

        z1, z2 = whiten(z1), whiten(z2)
        diag = _all_reduce((z1 * z2).sum(0)) / n  # C_ii
        if 2 * n * n < b * d:  # two (N, N) Gram matrices cost less than one (D, D) product
            z1, z2 = _all_gather(z1), _all_gather(z2)
            frob = ((z1 @ z1.T) * (z2 @ z2.T)).sum() / (n * n)
        else:
            frob = (_all_reduce(z1.T @ z2) / n).pow(2).sum()
        inv, red = (1 - diag).pow(2).sum(), lambd * (frob - diag.pow(2).sum())
        if not parts:
            return inv + red
        inv, red = inv.detach(), red.detach()
        return (1 - diag).pow(2).sum() + lambd * (frob - diag.pow(2).sum()), dict(
            loss_inv=inv, loss_red=red, inv_per_dim=inv / d, red_per_dim=red / d)


def vicreg_loss(z1, z2, sim=25.0, var=25.0, cov=1.0, eps=1e-4):
    """VICReg loss (Bardes et al. 2022, as Facebook's main_vicreg.py) on the global batch, in
    fp32 whatever the autocast dtype. z1, z2: (B, D) local embeddings, B equal on every rank;
    both are all-gathered with gradients into the global batch of N first, then
        sim * mean_nj (z1_nj - z2_nj)^2                                      invariance
      + var * (mean_j relu(1 - sqrt(Var(z1)_j + eps)) + the same for z2) / 2    variance
      + cov * (sum_{i!=j} Cov(z1)_ij^2 + the same for z2) / D                 covariance
    with the unbiased Var and Cov = zc^T zc / (N - 1) over the centred global batch zc.

    sum_{i!=j} Cov_ij^2 = ||zc^T zc||_F^2 / (N - 1)^2 - sum_j Var_j^2, and ||zc^T zc||_F =
    ||zc zc^T||_F: the (N, N) Gram matrix when N < D, O(N^2 D) instead of O(N D^2). Every rank
    computes the same global loss; the gather's backward sums the ranks' gradients, so with
    DDP's averaging the gradients equal those of one process on the whole batch."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = _all_gather(z1.float()), _all_gather(z2.float())  # (N, D) each
        n, d = z1.shape

        def regularisers(z):  # (N, D) -> variance hinge, sum of squared off-diagonal Cov
            z = z - z.mean(0)
            v = z.pow(2).sum(0) / (n - 1)  # (D,) unbiased variance = Cov's diagonal
            hinge = F.relu(1 - torch.sqrt(v + eps)).mean()
            gram = z @ z.T if n < d else z.T @ z
            return hinge, gram.pow(2).sum() / (n - 1) ** 2 - v.pow(2).sum()

        (h1, c1), (h2, c2) = regularisers(z1), regularisers(z2)
        return sim * F.mse_loss(z1, z2) + var * (h1 + h2) / 2 + cov * (c1 + c2) / d


def simclr_loss(z1, z2, temperature=0.1):
    """SimCLR's NT-Xent (Chen et al. 2020) on the global batch, in fp32 whatever the autocast
    dtype. z1, z2: (B, D) local embeddings, B equal on every rank. Over the 2N L2-normalised
    embeddings u of the global batch (both views), with s_ik = u_i . u_k / temperature,
        loss = 1/(2N) sum_i -log(exp(s_i,p(i)) / sum_{k != i} exp(s_ik))
    where p(i) is the other view of image i: a 2N-way cross-entropy, self-similarity excluded.
    Each rank scores only its own 2B anchors against all 2N candidates (gathered with
    gradients, so the negatives come from the global batch): a (2B, 2N) matrix, not (2N, 2N).
    The autograd-aware sum over ranks makes the value the global loss on every rank and, with
    DDP's averaging, the gradients those of one process on the whole batch."""
    with torch.autocast(z1.device.type, enabled=False):
        b, n = z1.shape[0], z1.shape[0] * _world()
        u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        candidates = torch.cat([_all_gather(u1), _all_gather(u2)])  # (2N, D) views 1, then 2
        logits = torch.cat([u1, u2]) @ candidates.T / temperature  # (2B, 2N) local anchors
        rank = dist.get_rank() if _world() > 1 else 0  # the group's, as _world (not $RANK)
        i = torch.arange(b, device=z1.device) + b * rank
        own, other = torch.cat([i, i + n]), torch.cat([i + n, i])  # anchors' candidate columns
        logits = logits.masked_fill(F.one_hot(own, 2 * n).bool(), float('-inf'))
        return _all_reduce(F.cross_entropy(logits, other, reduction='sum')) / (2 * n)


OBJECTIVES = {  # --objective name -> (loss on (z1, z2), its default settings, what it is)
    'barlow': (barlow_loss, dict(lambd=0.0051),
               'Barlow Twins: cross-correlation of the two views towards the identity'),
    'vicreg': (vicreg_loss, dict(sim=25.0, var=25.0, cov=1.0),
               'VICReg: view MSE + per-feature std hinge + covariance decorrelation'),
    'simclr': (simclr_loss, dict(temperature=0.1),
               'SimCLR: NT-Xent contrast against the rest of the global batch'),
}


class SSLModel(nn.Module):
    """backbone + projector trained with one of OBJECTIVES; forward(y1, y2) returns the loss,
    forward(y1, y2, stats=True) returns (loss, stats): the view-1 backbone features (B,
    width), detached, and for Barlow Twins the loss's parts (barlow_loss). settings override
    the objective's defaults (SSLModel(b, w, p, 'simclr', temperature=0.2))."""

    def __init__(self, backbone, width, projector='8192-8192-8192', objective='barlow',
                 **settings):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserError(f'--objective {objective}: expected one of {" | ".join(OBJECTIVES)}')
        self.loss_fn, defaults, _ = OBJECTIVES[objective]
        self.objective, self.settings = objective, {**defaults, **settings}
        # a misspelt setting fails here (TypeError), not at the first training step
        inspect.signature(self.loss_fn).bind(None, None, **self.settings)
        self.backbone, self.projector = backbone, make_projector(width, projector)

    def forward(self, y1, y2, stats=False):
        h1 = self.backbone(y1)  # (B, width)
        z1 = self.projector(h1)  # (B, D) per view
        z2 = self.projector(self.backbone(y2))
        if not stats:
            return self.loss_fn(z1, z2, **self.settings)
        if self.loss_fn is barlow_loss:
            loss, parts = barlow_loss(z1, z2, **self.settings, parts=True)
        else:
            loss, parts = self.loss_fn(z1, z2, **self.settings), {}
        return loss, dict(parts, features=h1.detach())


class Classifier(nn.Module):
    """backbone + Linear(width, classes): pretrain_supervised.py and finetune.py."""

    def __init__(self, backbone, width, classes):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def classifier_task(rt, backbone, width, classes, view, label_smoothing=0.0,
                    class_weight=None, compile=False):
    """What supervised pretraining and fine-tuning share: backbone + linear head wrapped for
    the runtime, and the step: cross-entropy of the logits of one augmented `view` (a dict of
    preset_params) of the uint8 batch. Returns (model, raw, step_fn) for fit."""
    model, raw = wrap_model(rt, Classifier(backbone, width, classes), compile)
    weight = None if class_weight is None else class_weight.float().to(rt.device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def step_fn(x, y, generator):
        return criterion(model(augment(x, view, generator)), y)
    return model, raw, step_fn


class BarlowTwins(SSLModel):
    """SSLModel with the Barlow Twins objective, Facebook's module's signature."""

    def __init__(self, backbone, width, projector='8192-8192-8192', lambd=0.0051):
        super().__init__(backbone, width, projector, 'barlow', lambd=lambd)


# --------------------------------------------------------------------------- optimisers, schedule
class LARS(torch.optim.Optimizer):
    """LARS as Facebook's Barlow Twins: SGD with momentum where each weight's update is scaled
    by eta * ||w|| / ||g + wd * w||; 1-d parameters (biases, BN) get neither weight decay nor
    the adaptation. Under fp16 the loss scaler hands step() its scale and overflow flag
    (`grad_scale`, `found_inf`: torch's contract for an optimizer that unscales itself), and a
    step with an overflow leaves weights and momentum as they were without the host reading
    the flag (the scaler's own skip reads it every step: a wait on CUDA)."""
    _step_supports_amp_scaling = True

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta))

    @torch.no_grad()
    def step(self):
        scale, found_inf = getattr(self, 'grad_scale', None), getattr(self, 'found_inf', None)
        skip = None if found_inf is None else found_inf > 0  # stays on the device
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                dp = p.grad if scale is None else p.grad / scale
                if p.ndim != 1:
                    dp = torch.add(dp, p, alpha=g['weight_decay'])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    dp.mul_(torch.where((w_norm > 0) & (u_norm > 0), g['eta'] * w_norm / u_norm,
                                        1.0))
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                if skip is None:
                    mu.mul_(g['momentum']).add_(dp)
                    p.add_(mu, alpha=-g['lr'])
                else:  # the same arithmetic, taken or dropped on the device
                    mu.copy_(torch.where(skip, mu, mu * g['momentum'] + dp))
                    p.add_(torch.where(skip, 0.0, mu), alpha=-g['lr'])


def make_optimizer(named_groups, name, lr, lr_biases, weight_decay, batch_size, momentum=0.9):
    """named_groups: {role: module}. Two groups per role: weights (ndim > 1) and biases/BN
    (ndim 1, no weight decay). Peak lrs are per 256 images, scaled by global batch / 256.
    Each group keeps 'peak_lr' and 'role' so the loop can set lr every step."""
    scale = batch_size / 256
    groups = []
    for role, module in named_groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        for kind, ps, plr, wd in (('weights', [p for p in params if p.ndim > 1], lr,
                                   weight_decay),
                                  ('biases', [p for p in params if p.ndim == 1], lr_biases, 0.0)):
            if ps:
                groups.append(dict(params=ps, peak_lr=plr * scale, lr=0.0, weight_decay=wd,
                                   role=role, kind=kind))
    if name == 'lars':
        return LARS(groups, lr=0.0, momentum=momentum)
    # fused: one kernel over every tensor, where torch's default on the CPU is a Python loop
    # over them. A ResNet-18 step (11M parameters, 2-core AMD EPYC, `tests/bench.py --only
    # optim`): AdamW 14.5 ms instead of 47-77, SGD 8.8 instead of 20.4, next to a 32 px
    # fine-tuning step of about 190 ms
    fused = all(p.device.type in ('cpu', 'cuda') and p.is_floating_point()
                for g in groups for p in g['params'])
    if name == 'sgd':
        sgd = torch.optim.SGD(groups, lr=0.0, momentum=momentum, nesterov=True, fused=fused)
        # fused SGD makes its momentum buffers with empty_like on its first step; a first step
        # the fp16 loss scaler skips (an overflow, common at the initial scale) leaves them
        # uninitialised and the next step moved the weights by 1e21. Zeros give the first
        # step's buffer exactly (0.9 x 0 + grad) and make every step an ordinary one
        for p in (p for g in groups for p in g['params']) if fused else ():
            sgd.state[p]['momentum_buffer'] = torch.zeros_like(p)
        return sgd
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=0.0, fused=fused)
    raise UserError(f'--optimizer {name}: choose lars, sgd or adamw')


def lr_factor(step, total, warmup, kind='cosine', final=0.001):
    """Multiplier of the peak lr at `step`, a pure function of the step (resume needs only the
    step). cosine: linear warmup from 0, then cosine to `final`. onecycle (fastai's
    fit_one_cycle): cosine up from 1/25 over `warmup` steps, then cosine down to 1/1e5."""
    cos = lambda a, b, t: b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    if kind == 'onecycle':
        if step < warmup:
            return cos(1 / 25, 1.0, step / warmup)
        return cos(1.0, 1e-5, (step - warmup) / max(1, total - warmup))
    if kind == 'cosine':
        if step < warmup:
            return step / warmup
        return cos(1.0, final, (step - warmup) / max(1, total - warmup))
    if kind == 'constant':
        return 1.0
    raise UserError(f'--schedule {kind}: choose cosine, onecycle or constant')


# --------------------------------------------------------------------------- the training loop
def wrap_model(rt, model, compile=False):
    """(model to call, raw model to save). SyncBatchNorm + DDP when distributed on CUDA, DDP
    alone on CPU (gloo), channels_last on CUDA, optional torch.compile. The raw handle keeps
    checkpoint keys free of `module.` and `_orig_mod.`."""
    raw = model.to(rt.device)
    if rt.device.type == 'cuda':
        raw = raw.to(memory_format=torch.channels_last)
    run = raw
    if rt.world > 1:
        if rt.device.type == 'cuda':
            run = nn.SyncBatchNorm.convert_sync_batchnorm(run)
            raw = run
        run = DDP(run, device_ids=[rt.local_rank] if rt.device.type == 'cuda' else None)
    if compile:
        run = torch.compile(run)
    return run, raw


def step_generator(seed, step, rank):
    """The augmentation RNG of one step on one rank: a pure function of (seed, step, rank), so
    a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and exit at the next check, while
    training; restore() puts the previous handlers back."""

    def __init__(self):
        self.signum = 0
        self.old = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def grad_scaler(rt):
    """The loss scaler of the runtime's precision: active for fp16 only (bf16 and fp32 need
    none), so every precision runs the same step code."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)


def train_step(rt, step_fn, optimizer, scaler, batch, generator):
    """One optimisation step, the loop's and the lr range test's: the batch to the device,
    step_fn under autocast (it returns the loss, or (loss, stats): a dict of detached tensors
    for the log), backward through the scaler, the optimizer step. Returns (loss detached,
    stats), still on the device: reading them waits for the step to finish."""
    x, y = to_device(batch, rt.device)
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32):
        out = step_fn(x, y, generator)
    loss, stats = out if isinstance(out, tuple) else (out, {})
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), stats


def fresh_state(optimizer, params):
    """Zero the optimizer state of `params` in place: what AdamW (step 0, zero moments), SGD's
    momentum and LARS start from (a zero momentum buffer takes the first gradient whole)."""
    for p in params:
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v):
                v.zero_()


def fit(rt, model, raw, optimizer, loader, step_fn, out, total_steps, lr_fn, *, config=None,
        seed=0, max_steps=0, log_every=10, ckpt_every=0, ckpt_minutes=10.0, epoch_fn=None,
        log_fn=None, nan_at_step=-1, head_steps=0):
    """The one training loop over `loader` (make_loader's; len(loader) steps per epoch).
    step_fn(x_uint8 (B,3,S,S), y, generator) -> scalar loss runs under autocast; lr_fn(step,
    group) -> lr; `model` is what runs, `raw` what is saved (wrap_model's pair). `config`: the
    plain values that define the run (architecture, batch, data, schedule...), saved in
    out/ckpt.pt with the optimizer's class. With out/ckpt.pt present the run resumes from it,
    mid-epoch, when its config is the same, and is refused otherwise; the lrs, the weight
    decay and the precision may change on resume. max_steps > 0 caps total_steps.

    The host waits for the device only at check steps: every log_every steps, every
    ckpt_every steps and the last one. There the loss is read and logged, a non-finite loss
    since the last check, or non-finite weights (an update with non-finite gradients), stops
    the run (checkpoints are written only right after a check passed, so the last one is
    intact), a pending SIGTERM/SIGINT checkpoints and exits, and a
    checkpoint is written when ckpt_every or ckpt_minutes says so. Under DDP every rank takes
    these decisions at the same step. A step_fn may return (loss, stats): the 0-d tensors of
    stats go to each log record, and log_fn(stats) -> dict adds figures computed from the
    rest (collapse signals from features). epoch_fn(epoch) -> dict runs after each full
    epoch (validation) and what it returns goes to the log. head_steps: phase_lr's head-only
    steps; the weights it holds at lr 0 in them (held_in_head) start the rest with fresh
    optimizer state, as if they had been frozen (fastai's freeze: no gradient, no state),
    where they would bring the moments of gradients they were never moved by.
    nan_at_step poisons that step's loss (for tests). Returns the final step."""
    steps_per_epoch, sampler = len(loader), loader.sampler
    total_steps = min(total_steps, max_steps) if max_steps else total_steps
    config = dict(config or {}, optimizer=type(optimizer).__name__)  # its state is its own
    ckpt_path = os.path.join(out, 'ckpt.pt')
    scaler = grad_scaler(rt)
    step = 0
    found = os.path.exists(ckpt_path)
    if rt.world > 1:  # rank 0 writes it; a rank that cannot see it would train from step 0
        seen = torch.tensor([found, not found], dtype=torch.int32, device=rt.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen.tolist() == [1, 1]:
            raise UserError(f'{ckpt_path} is there for some ranks and not for others: every '
                            f'node must see the same --out (a shared filesystem)')
    if found:
        state = load_checkpoint(ckpt_path)
        old = state.get('config', state.get('args', {}))
        diff = [k for k in config if old.get(k, '(not recorded)') != config[k]]
        if diff:
            raise UserError(f'{ckpt_path} was made with ' + ', '.join(
                f'{k} {old.get(k, "(not recorded)")}' for k in diff) + ' (this run: ' +
                ', '.join(f'{k} {config[k]}' for k in diff) + '); rerun with those settings '
                'to resume, or use another --out')
        fresh = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
        try:
            raw.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
            for g, f in zip(optimizer.param_groups, fresh):
                g.update(f)  # the flags win over the checkpoint: peak_lr, weight_decay
        except (RuntimeError, ValueError) as e:  # another model: classes, projector, blocks
            first = str(e).strip().splitlines()[-1].strip()[:200]
            raise UserError(f'{ckpt_path} does not fit this model ({first}); use another '
                            f'--out, or delete it to start over')
        if state['scaler']:  # empty from a run without fp16: this one's starts afresh
            scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(state['rng_cpu'])
        if rt.device.type == 'cuda' and 'rng_cuda' in state:
            torch.cuda.set_rng_state(state['rng_cuda'], rt.device)
        step = state['step']
        print0(f'resumed {ckpt_path} at step {step} (epoch {step // steps_per_epoch}, '
               f'batch {step % steps_per_epoch})')

    def save(step):
        if rt.is_main:
            state = dict(model=raw.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict(), step=step, epoch=step // steps_per_epoch,
                         pos=step % steps_per_epoch, rng_cpu=torch.get_rng_state(),
                         config=config)
            if rt.device.type == 'cuda':
                state['rng_cuda'] = torch.cuda.get_rng_state(rt.device)
            torch_save(state, ckpt_path)

    def poisoned(*a):  # the testing hook: this step's loss becomes NaN
        out = step_fn(*a)
        return (out[0] * float('nan'), out[1]) if isinstance(out, tuple) else out * float('nan')

    saved_step = step if os.path.exists(ckpt_path) else -1
    bad_step = torch.full((), -1, dtype=torch.long, device=rt.device)  # first non-finite
    global_batch = sampler.batch_size * rt.world
    stop = _StopFlag()
    checked = step  # the step of the last check (or where the run started)
    if rt.device.type == 'cuda':  # the log's mem_gb: this run's peak, not an earlier seed's
        torch.cuda.reset_peak_memory_stats(rt.device)
    try:
        model.train()
        t_log = t_ckpt = time.time()
        seen = 0
        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip=pos)
            for batch in loader:
                if head_steps and step == head_steps:  # the step, not the run: resume-safe
                    fresh_state(optimizer, held_in_head(optimizer))
                for g in optimizer.param_groups:
                    g['lr'] = lr_fn(step, g)
                loss, stats = train_step(rt, step_fn if step != nan_at_step else poisoned,
                                         optimizer, scaler, batch,
                                         step_generator(seed, step, rt.rank))
                # remember the first non-finite step on the device: no wait here
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
                step += 1
                seen += global_batch
                check = step % log_every == 0 or step == total_steps or \
                    bool(ckpt_every and step % ckpt_every == 0)
                signum = late = 0
                if check:  # the one place the host waits, every rank at the same step
                    now = time.time()
                    # the losses cover the weights before each step; the weights themselves
                    # cover the last update (a finite loss with non-finite gradients)
                    weights_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(
                        [t for t in raw.state_dict().values() if t.is_floating_point()]))
                    flags = torch.stack([
                        bad_step, torch.tensor(stop.signum, device=rt.device),
                        torch.tensor(int(now - t_ckpt > 60 * ckpt_minutes), device=rt.device),
                        weights_bad.long().to(rt.device)])
                    if rt.world > 1:
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    bad, signum, late, weights_bad = flags.tolist()
                    last_check, checked = checked, step
                    if bad >= 0 or weights_bad:
                        what = (f'loss is not finite at step {bad} (epoch '
                                f'{bad // steps_per_epoch})' if bad >= 0 else
                                f'the weights are not finite after {step} steps (epoch '
                                f'{(step - 1) // steps_per_epoch}): a step since step '
                                f'{last_check} had non-finite gradients, with finite losses')
                        raise UserError(
                            f'{what}; stopped. ' +
                            (f'The last good checkpoint {ckpt_path} (step {saved_step}) is '
                             f'intact; ' if saved_step >= 0 else 'No checkpoint yet; ') +
                            'lower --lr, or try --precision fp32, then rerun to resume')
                    if step % log_every == 0 or step == total_steps or signum:
                        extra = {k: v.item() for k, v in stats.items() if v.ndim == 0}
                        extra.update(log_fn(stats) if log_fn else {})
                        _log(rt, out, loss, optimizer, step, total_steps, steps_per_epoch,
                             seen / max(now - t_log, 1e-9), global_batch, extra)
                        t_log, seen = now, 0
                if epoch_fn and step % steps_per_epoch == 0:
                    rec = epoch_fn(step // steps_per_epoch)
                    if rec and rt.is_main:
                        append_jsonl(os.path.join(out, 'log.jsonl'),  # rec may set epoch
                                     {'step': step, 'epoch': step // steps_per_epoch, **rec})
                if check and ((ckpt_every and step % ckpt_every == 0) or late or signum):
                    save(step)
                    saved_step, t_ckpt = step, now
                if signum:
                    print0(f'stopped by signal {int(signum)} at step {step}; {ckpt_path} saved, '
                           f'run the same command to resume')
                    teardown(rt, wait=False)
                    sys.exit(128 + int(signum))
                if step >= total_steps:
                    break
    finally:
        stop.restore()
    if step != saved_step:
        save(step)
    if stop.signum:  # it came after the last check (during the last epoch_fn): obey it now
        print0(f'signal {stop.signum} after the last step; {ckpt_path} saved, run the same '
               f'command to finish')
        signal.raise_signal(stop.signum)  # the previous handler's doing, as if never caught
    return step


def _log(rt, out, loss, optimizer, step, total, steps_per_epoch, rate, batch, extra):
    """One console line and one log.jsonl record (rank 0 writes); extra: more figures."""
    rec = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=loss.item(),
               lr=max(g['lr'] for g in optimizer.param_groups), img_s=round(rate, 1),
               eta_s=round((total - step) * batch / max(rate, 1e-9)), **extra)
    if rt.device.type == 'cuda':
        rec['mem_gb'] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
    print0(f'step {step}/{total} ep {rec["epoch"]:.2f} loss {rec["loss"]:.4g} '
           + ''.join(f'{k} {v:.3g} ' for k, v in extra.items()) +
           f'lr {rec["lr"]:.3g} img/s {rate:.0f} eta {fmt_time(rec["eta_s"])}'
           + (f' mem {rec["mem_gb"]}G' if 'mem_gb' in rec else ''))
    if rt.is_main:
        append_jsonl(os.path.join(out, 'log.jsonl'), rec)


def write_handoff(rt, out, backbone, meta):
    """backbone.pt (a torchvision ResNet state dict without fc, like Facebook's resnet50.pth)
    and meta.json (args, versions, git revision, data fingerprint, final figures)."""
    if not rt.is_main:
        return
    sd = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    import torchvision  # loaded already: the backbone came from it
    versions = dict(torch=torch.__version__, torchvision=torchvision.__version__,
                    python=sys.version.split()[0])
    meta = dict(meta, backbone_sha=state_fingerprint(sd), versions=versions, git=git_revision())
    write_json(os.path.join(out, 'meta.json'), meta)
    torch_save(sd, os.path.join(out, 'backbone.pt'))  # last: the file `make` waits for


def git_revision():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 -- not a git checkout
        return None


def warn_if_never_warm(warmup_epochs, epochs):
    """One line when the warmup does not end within the epochs it schedules: the lr would
    never reach its peak (a 25-epoch warmup in a 2-epoch run peaks at 5%)."""
    if warmup_epochs is not None and warmup_epochs >= epochs:
        print0(f'note: --warmup-epochs {warmup_epochs:g} is not shorter than the run\'s '
               f'{epochs:g} epochs: the lr never reaches its peak; give a shorter warmup')


def held_in_head(optimizer):
    """The parameters phase_lr holds at lr 0 in the head-only steps: the 'backbone' role's
    weights (fit gives them fresh optimizer state when those steps end)."""
    return [p for g in optimizer.param_groups if (g['role'], g['kind']) == ('backbone', 'weights')
            for p in g['params']]


def lr_range_test(rt, model, raw, loader, step_fn, optimizer, seed, steps=100):
    """fastai's lr_find: the lr grows exponentially from 1e-7 to 10 over up to `steps`
    batches, stopping when the smoothed loss passes 4x its minimum; returns the lr at the
    minimum of the smoothed loss / 10 (one lr for every parameter group). Each step is the
    loop's own (train_step, the precision's loss scaler included). The weights, the
    optimizer's state and torch's random state are as before when it returns."""
    saved = {k: v.clone() for k, v in raw.state_dict().items()}
    opt_state = copy.deepcopy(optimizer.state_dict())  # its tensors change in place
    scaler = grad_scaler(rt)
    lrs, losses, avg, step, epoch = [], [], 0.0, 0, 0
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == 'cuda' else []):
        while step < steps:
            loader.sampler.set_epoch(10_000 + epoch)
            for batch in loader:
                lr = 1e-7 * (10 / 1e-7) ** (step / (steps - 1))
                for g in optimizer.param_groups:
                    g['lr'] = lr
                loss, _ = train_step(rt, step_fn, optimizer, scaler, batch,
                                     step_generator(seed, step, rt.rank))
                mean = loss.float()
                if rt.world > 1:  # every rank must take the same decisions
                    dist.all_reduce(mean)
                    mean /= rt.world
                avg = 0.98 * avg + 0.02 * mean.item()
                smooth = avg / (1 - 0.98 ** (step + 1))  # bias-corrected moving average
                if not math.isfinite(smooth) or (losses and smooth > 4 * min(losses)):
                    step = steps
                    break
                lrs.append(lr)
                losses.append(smooth)
                step += 1
                if step >= steps:
                    break
            epoch += 1
    raw.load_state_dict(saved)
    optimizer.load_state_dict(opt_state)
    if not losses:
        raise UserError('lr range test: the loss was not finite from the first step; '
                        'pass a number to --lr')
    return lrs[losses.index(min(losses))] / 10


def phase_lr(step, group, total, warmup, kind, head_steps=0):
    """lr of a param group at a step. The first head_steps train the head alone (the
    'backbone' role's weights get lr 0; its 1-d BN/bias parameters stay trainable, as fastai's
    freeze), each phase with its own schedule; a pure function of the step."""
    if step < head_steps:
        if group['role'] == 'backbone' and group['kind'] == 'weights':
            return 0.0
        return group['peak_lr'] * lr_factor(step, head_steps, head_steps // 4, kind)
    return group['peak_lr'] * lr_factor(step - head_steps, total - head_steps, warmup, kind)


@torch.no_grad()
def predict(rt, fn, cache, positions, batch_size, views, softmax=False, seed=0, workers=0,
            drawn=None):
    """fn over the cache images at `positions`, in order, under autocast (the caller sets
    eval mode), averaged over views (a list of augmentation params, one pass each; random
    views draw from a generator seeded by (seed, batch, pass), or take their values from
    drawn: per view, draw_params for all the positions). softmax=True averages probabilities
    (test-time augmentation). Returns (outputs float32 on CPU, labels).
    The outputs stay on the device until the last batch is queued, then come back in one copy:
    the host never waits for the device between batches (N x width floats of device memory:
    153 MB for probe.py's ResNet-50 features of make paper's 18,633 test images)."""
    loader = make_loader(cache, positions, batch_size, shuffle=False, drop_last=False,
                         workers=workers, pin=rt.device.type == 'cuda')
    outs, labels = [], []
    for b, batch in enumerate(loader):
        x, _ = to_device(batch, rt.device)
        labels.append(batch[1])  # the host's copy: no read back
        acc, x = 0, _as_float(x)
        for v, view in enumerate(views):
            if drawn:
                d = take_params(drawn[v], slice(b * batch_size, b * batch_size + len(x)))
            else:
                g = torch.Generator().manual_seed((seed * 7919 + b) * 101 + v)
                d = draw_params(view, len(x), x.shape[2], x.shape[3], g)
            with torch.autocast(rt.device.type, dtype=rt.dtype,
                                enabled=rt.dtype != torch.float32):
                o = fn(apply_params(x, view, d)).float()
            acc = acc + (torch.softmax(o, 1) if softmax else o)
        outs.append(acc / len(views))
    return torch.cat(outs).cpu(), torch.cat(labels)


# --------------------------------------------------------------------------- evaluation runs
def get_split(ds, split_file=None, protocol='random'):
    """(split, file): split_file when given (it must exist); else
    splits/<dataset>-<protocol>.json, made once and reused by every later script (each rank
    makes the same split, being seeded; the job's rank 0 writes it). The evaluation scripts
    use it: a split without test images is refused before any work."""
    if split_file:
        split, path = load_split(split_file, ds), split_file
    elif os.path.exists(split_path(ds, protocol)):
        path = split_path(ds, protocol)
        split = load_split(path, ds)
    else:
        counts = PAPER_PER_CLASS if set(ds['classes']) == set(PAPER_PER_CLASS) else 500
        try:  # the paper protocol on ISIC 2019's classes: the paper's counts
            split = make_split(ds, protocol, seed=0, per_class=counts)
        except UserError as e:
            raise UserError(f'{e} (to --protocol {protocol} without --split: make the split '
                            f'with `python common.py split --protocol {protocol} --per-class '
                            f'... --out FILE`, then pass --split FILE)') from None
        path = split_path(ds, protocol)
        if dist_info()[0] == 0:
            save_split(path, split)
            print0(f'split: wrote {path}')
    if not split['test']:
        raise UserError(f'split {path} has no test images: nothing to evaluate on; make one '
                        f'with a test part (common.py split --test-fraction > 0)')
    return split, path


def split_sha(split):
    """Names a split by its test ids: results from different test sets never mix."""
    return hashlib.sha1('\n'.join(split['test']).encode()).hexdigest()[:10]


def init_meta(init):
    """What a pretraining run recorded about an --init PATH (its meta.json: objective, pool
    images, ...); {} for named weights and files without one."""
    path = init_file(init)
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), 'meta.json')
    return read_json(meta, 'run metadata') if os.path.isfile(path) and \
        os.path.isfile(meta) else {}


def lineage_entry(script, out, data_root, extra, held_out):
    """One pretraining run as meta.json's lineage records it: where its pool came from (the
    data root and the extra folders, resolved) and the split_sha whose test images it held
    out (None: none). fit refuses a resume with another pool, so this holds for every segment
    of the run, from its first step."""
    return dict(script=script, out=os.path.abspath(out), held_out=held_out,
                roots=[os.path.realpath(p) for p in [data_root, *extra]])


def init_lineage(init, backbone_sha):
    """The pretraining runs (oldest first) behind the weights of --init, backbone_sha their
    state_fingerprint: [] for random and named weights and for a file with no meta.json beside
    it (a foreign checkpoint); else what that meta.json records, if it describes these very
    weights. A run recorded before lineages were is returned with proven=False."""
    if init == 'random' or any(init == name for name, _ in NAMED_WEIGHTS):
        return []
    path = init_file(init)
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), 'meta.json')
    if not os.path.isfile(path):
        return []
    if not os.path.isfile(meta):
        state = load_checkpoint(path)
        if isinstance(state, dict) and state.get('format') == CLASSIFIER_FORMAT:
            return state.get('lineage', [])  # a kept classifier: what its weights have seen
        if isinstance(state, dict) and isinstance(state.get('config'), dict):
            raise UserError(f'{path} is the checkpoint of an unfinished run: what it was '
                            f'trained on is recorded when the run hands off; finish the run '
                            f'and pass its backbone.pt')
        return []  # a foreign checkpoint: nothing of ours to know
    info = read_json(meta, 'run metadata')
    if not isinstance(info, dict) or info.get('backbone_sha') != backbone_sha:
        raise UserError(f'{meta} describes other weights than {path} (backbone_sha '
                        f'{info.get("backbone_sha") if isinstance(info, dict) else None}, the '
                        f'file {backbone_sha}), so what they were trained on is unknown; '
                        f'remove that meta.json if the file is foreign, or pretrain again')
    if 'lineage' in info:
        return info['lineage']
    roots = [os.path.realpath(info['data_root'])] if info.get('data_root') else []
    return [dict(script=info.get('script'), out=os.path.dirname(os.path.abspath(meta)),
                 held_out=info.get('held_out'), roots=roots, proven=False)]


def path_overlaps(roots, root):
    """Whether a pool drawn from `roots` can hold images of the dataset at `root`."""
    root = os.path.realpath(root)
    return any(os.path.commonpath([r, root]) in (r, root) for r in roots)


def check_held_out(init, ds, split, backbone_sha=None):
    """Refuse a backbone (--init PATH with a meta.json beside it) any of whose pretraining
    runs drew on this dataset (its root or a folder inside it) without this split's test part
    held out, in every segment: its features have seen the test set. backbone_sha: the
    state_fingerprint of the loaded weights (read from the file when None). Returns the
    lineage it checked (init_lineage's), for what is made from these weights."""
    if backbone_sha is None:
        path = init_file(init)
        if not os.path.isfile(path):
            return []
        backbone_sha = state_fingerprint(clean_state_dict(load_checkpoint(path), path))
    sha, lineage = split_sha(split), init_lineage(init, backbone_sha)
    for run in lineage:
        proven = run.get('proven', True)
        if path_overlaps(run['roots'], ds['root']) and (run['held_out'] != sha or not proven):
            why = ('without holding out this split\'s test images' if proven
                   else 'by a version that did not record whether all of it held out this '
                        'split\'s test images')
            raise UserError(f'{init} comes from {run["out"]} ({run["script"]}), trained on '
                            f'{ds["root"]} {why}; train it with the same --split')
    return lineage


def label_counts(ds, ids):
    """{class name: labelled images among ids}, every class of ds listed (0 when absent):
    the rows record it per seed, and it shows a --labels-per-class above what a class has."""
    k_of = {i: k for k, i in enumerate(ds['ids'])}  # image id -> its place in ds
    n = collections.Counter(ds['labels'][k_of[i]] for i in ids)
    return {c: n[k] for k, c in enumerate(ds['classes'])}


def short_classes(ds, train_ids, per_class):
    """{class: images} of the classes whose train part holds fewer than per_class labelled
    images (each seed then gets them all), with a note; {} without per_class."""
    short = {c: n for c, n in label_counts(ds, train_ids).items() if n < (per_class or 0)}
    if short:
        print0(f'note: --labels-per-class {per_class}: the train part holds fewer for '
               f'{few(f"{c} ({n})" for c, n in short.items())}; every seed gets all of those '
               f'(the rows record them as labels_short)')
    return short


def labels_rule(per_class=None, fraction=None):
    """How the labelled set of a seed is drawn (labelled_subset's arguments), as recorded in
    the result rows: 'per_class=K', 'fraction=F' or 'all'."""
    if per_class:
        return f'per_class={per_class}'
    return f'fraction={fraction}' if fraction else 'all'


def result_stub(ds, split, split_file, seed, *, init, init_source, arch, backbone_sha,
                labels_rule, protocol, eval_part='test', **extra):
    """The fields that name a result row (result_key reads them), and `extra` ones to
    record; the metrics come later. eval_part: the part scored, test (results) or val
    (choosing budgets)."""
    return dict(init=init, init_source=init_source, arch=arch, backbone_sha=backbone_sha,
                dataset=dataset_name(ds), split=split['protocol'], split_sha=split_sha(split),
                split_file=split_file, labels_rule=labels_rule, protocol=protocol, seed=seed,
                eval_part=eval_part, **extra)


def result_key(row):
    """What makes two result rows the same run (a rerun replaces, a resume skips). Training
    settings (epochs, lr, size) are not part of it: change --results to compare those."""
    return (row['init'], row['backbone_sha'], row['dataset'], row['split_sha'],
            row['labels_rule'], row['protocol'], row['seed'], row.get('eval_part', 'test'))


def done_keys(path):
    """Keys of the result rows already in a results file, to skip finished seeds. Bad lines
    are treated as report.py treats them, before any training: a torn line is named and
    ignored, a line that is no result row is refused; a row that lacks part of the key (an
    older version's) is named and matches nothing."""
    keys = set()
    if not os.path.exists(path):
        return keys
    for lineno, row in read_jsonl(path):
        missing = [k for k in ('init', 'protocol', 'seed', 'metrics') if k not in row]
        if missing:
            raise UserError(f'{path}:{lineno}: missing key(s) {", ".join(missing)}; fix or '
                            f'delete that line')
        try:
            keys.add(result_key(row))
        except (KeyError, TypeError) as e:
            print0(f'note: {path}:{lineno}: a row without a usable {e}, matched against no '
                   f'seed', file=sys.stderr)
    return keys


def pending_rows(results, seeds, ds, split, split_file, **fields):
    """Result stubs (result_stub with these fields) of the seeds whose rows are not in the
    results file yet; each seed that is gets a 'skipped' line."""
    done, todo = done_keys(results), []
    for row in (result_stub(ds, split, split_file, seed, **fields) for seed in seeds):
        if result_key(row) in done:
            print0(f'seed {row["seed"]}: already in {results}, skipped')
        else:
            todo.append(row)
    return todo


def run_seeds(rt, rows, run, results, describe):
    """Run run(row) for each pending result stub: it returns the finished row, or (finished
    row, then) with then() to call once the row is safely appended (finetune.py deletes the
    seed's checkpoint there). Print describe(finished) and append the row to `results` (each
    runtime's main process; one O_APPEND write per row, so processes sharing the file keep
    their lines whole). Under parallel_seeds a failing seed is reported with its rank and
    seed and the others go on; once every rank is done (settle), the command stops with one
    line naming them. Returns the finished rows."""
    done, failed = [], []
    for row in rows:
        try:
            out = run(row)
            row, then = out if isinstance(out, tuple) else (out, None)
        except Exception as e:  # noqa: BLE001 -- reported with its seed, then re-raised
            if rt.seed_ranks == 1:
                raise
            failed.append(row['seed'])
            print(f'error: rank {rt.seed_rank}, seed {row["seed"]}: {type(e).__name__}: {e}',
                  file=sys.stderr, flush=True)
            continue
        if rt.seed_ranks > 1:  # every rank reports its own seeds
            print(f'[rank {rt.seed_rank}] {describe(row)}', flush=True)
        else:
            print0(describe(row))
        if rt.is_main:
            append_jsonl(results, row, sync=True)
            if then:
                then()
        done.append(row)
    settle(rt)
    if failed:
        raise UserError(f'rank {rt.seed_rank}: seed(s) {few(failed)} failed (reasons above); '
                        f'the other rows are in {results}; rerun to retry them')
    return done


# --------------------------------------------------------------------------- metrics
def classification_metrics(probs, labels, num_classes):
    """Test-set metrics from (N, C) class probabilities and (N,) int labels, as plain JSON
    values (float, int, list, None). probs and labels may be torch tensors or numpy arrays.

    With pred_i = argmax_k probs[i, k] (first index on a tie), T_k = #{labels == k} (true
    support), P_k = #{pred == k}, TP_k = #{labels == k and pred == k}:
      accuracy           sum_k TP_k / N
      per_class_recall   TP_k / T_k; None when T_k == 0 (the class is absent from the labels)
      balanced_accuracy  mean of the recalls that are not None (classes present in the labels;
                         sklearn balanced_accuracy_score, which also drops predicted-only ones)
      macro_f1           mean of F1_k = 2 TP_k / (T_k + P_k) over the classes with T_k + P_k > 0,
                         i.e. present in the labels or the predictions (sklearn f1_score with
                         labels=None, average='macro'). A class predicted but never true, or true
                         but never predicted, counts with F1_k = 0; a class with no true and no
                         predicted sample is left out (its F1 is 0/0).
      weighted_f1        sum_k T_k F1_k / N (sklearn average='weighted')
      auroc              macro one-vs-rest AUROC: mean over the classes k with 0 < T_k < N of
                         AUC_k = P(s+ > s-) + P(s+ == s-) / 2 with s = probs[:, k], computed
                         exactly as the Mann-Whitney U statistic on average ranks (ties get the
                         mean of their ranks): (sum of positives' ranks - T_k (T_k+1)/2)
                         / (T_k (N - T_k)). None when fewer than 2 classes are in the labels.
                         For C = 2 and rows summing to 1 this equals the binary AUROC of
                         probs[:, 1].
      confusion_matrix   C x C ints, rows = true class, columns = predicted class
      n                  N
    """
    p = probs.detach().cpu().double().numpy() if torch.is_tensor(probs) else np.asarray(
        probs, dtype=np.float64)
    y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    C = int(num_classes)
    if p.ndim != 2 or p.shape[1] != C or y.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f'classification_metrics: need probs (N, {C}) and labels (N,) with '
                         f'N > 0, got {tuple(p.shape)} and {tuple(y.shape)}')
    if not np.isfinite(p).all():
        raise ValueError('classification_metrics: probs contain NaN or inf')
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f'classification_metrics: labels outside 0..{C - 1}')
    n = len(y)
    pred = p.argmax(1)
    cm = np.bincount(y * C + pred, minlength=C * C).reshape(C, C)  # (C, C) rows = true
    tp, true_n, pred_n = np.diag(cm), cm.sum(1), cm.sum(0)

    recall = [float(tp[k] / true_n[k]) if true_n[k] else None for k in range(C)]
    seen = [r for r in recall if r is not None]
    f1 = {k: 2 * tp[k] / (true_n[k] + pred_n[k]) for k in range(C) if true_n[k] + pred_n[k]}
    aucs = [_auroc(p[:, k], y == k) for k in range(C) if 0 < true_n[k] < n]
    return {
        'accuracy': float(tp.sum() / n),
        'balanced_accuracy': float(sum(seen) / len(seen)),
        'macro_f1': float(sum(f1.values()) / len(f1)),
        'weighted_f1': float(sum(true_n[k] * f for k, f in f1.items()) / n),
        'auroc': float(sum(aucs) / len(aucs)) if aucs else None,
        'per_class_recall': recall,
        'confusion_matrix': cm.tolist(),
        'n': int(n),
    }


def knn_predict(train_x, train_y, x, classes, k=20, t=0.07):
    """Cosine kNN with similarity-weighted votes exp(sim / t), as DINO's: class probabilities
    (N, classes) of the rows of x from the k nearest rows of train_x (labels train_y)."""
    a, q = F.normalize(train_x.float(), dim=1), F.normalize(x.float(), dim=1)  # exp(1/t): 1.6e6
    sim, idx = (q @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(x), classes, dtype=sim.dtype, device=sim.device)
    votes.scatter_add_(1, train_y[idx], (sim / t).exp())
    return votes / votes.sum(1, keepdim=True)


def feature_stats(h, eps=1e-7):
    """Collapse signals of a batch of features h (B, D), as floats:
      feat_std  mean over the D dimensions of the std over the batch of the L2-normalised
                features: about 1/sqrt(D) when they spread over the sphere, 0 when every
                image maps to one point
      rankme    the effective rank of h (RankMe, Garrido et al. 2023): exp of the entropy of
                p_k = s_k / sum(s) + eps over the singular values s of h, from 1 (one
                direction) to min(B, D) (all directions used equally)."""
    h = h.detach().float()
    s = torch.linalg.svdvals(h)
    p = s / s.sum().clamp_min(1e-30) + eps
    return dict(feat_std=F.normalize(h, dim=1).std(0).mean().item(),
                rankme=(-(p * p.log()).sum()).exp().item())


def _auroc(score, positive):
    """Exact AUROC of one score vector for a boolean positive mask (both classes present):
    the Mann-Whitney U on average ranks, so a tie between a positive and a negative counts 1/2."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each group of equal scores
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average rank of each sample
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ------------------------------------------------------------------- using a fine-tuned model
# finetune.py --save-model DIR keeps each seed's classifier as DIR/<init-name>-seed<N>.pt, a
# dict of tensors and plain values (torch.load(weights_only=True) reads it):
#   {'format': 'finetuned-classifier', 'version': 1, 'arch', 'classes': [names],
#    'model': Classifier state dict (backbone.*, head.*), 'size' (eval pixels), 'cache_size',
#    'mean', 'std' (the eval view's normalisation), 'tta', 'aug' (the fine-tuning view, drawn
#    by the extra test-time passes), 'batch_size' and 'seed' (the test batches and seed the
#    passes were drawn with), 'result' (the fields of its result row)}
# `python common.py predict` scores any dataset with it the way fine-tuning scored the test part.
CLASSIFIER_FORMAT = 'finetuned-classifier'


def save_classifier(path, model, *, arch, classes, size, cache_size, aug, tta, batch_size,
                    seed, mean=IMAGENET_MEAN, std=IMAGENET_STD, result=None, lineage=()):
    """Write a fine-tuned Classifier (the raw module, not DDP or compiled) as a classifier
    file, atomically. lineage: the runs behind its weights (init_lineage's, and the
    fine-tuning's own entry), for check_held_out when it is passed as an --init."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch_save(dict(format=CLASSIFIER_FORMAT, version=1, arch=arch, classes=list(classes),
                    model=sd, size=int(size), cache_size=int(cache_size), mean=list(mean),
                    std=list(std), tta=int(tta), aug=aug, batch_size=int(batch_size),
                    seed=int(seed), result=dict(result or {}), lineage=list(lineage)), path)


def load_classifier(path):
    """(Classifier in eval mode on the CPU, the file's other fields) of a classifier file;
    anything else (a backbone.pt, a ckpt.pt, weights of another architecture) is refused in
    one line."""
    if os.path.isdir(path):
        raise UserError(f'--model {path}: a folder; pass one of its <init-name>-seed<N>.pt '
                        f'files')
    if not os.path.isfile(path):
        raise UserError(f'--model {path}: no such file')
    if not zipfile.is_zipfile(path):  # what torch.save writes, so every classifier file
        raise UserError(f'{path}: not a fine-tuned classifier file (those are zip archives, '
                        f'as torch.save writes)')
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or obj.get('format') != CLASSIFIER_FORMAT:
        what = 'not a dict'
        if isinstance(obj, dict) and 'optimizer' in obj and 'step' in obj:
            what = 'a resumable training checkpoint (ckpt.pt)'
        elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            what = 'a bare state dict (a backbone.pt or weights file)'
        elif isinstance(obj, dict):
            what = f'a dict with keys {few(obj, 4)}'
        raise UserError(f'{path}: not a fine-tuned classifier, it looks like {what}; make one '
                        f'with `finetune.py --save-model DIR`')
    need = ['version', 'arch', 'classes', 'model', 'size', 'cache_size', 'mean', 'std', 'tta',
            'aug', 'batch_size', 'seed']
    missing = [k for k in need if k not in obj]
    if missing or obj['version'] > 1:
        raise UserError(f'{path}: a classifier file of an unknown version ({obj.get("version")}'
                        f'; missing {few(missing) or "nothing"}); save it again')
    if obj['arch'] not in ARCHS:
        raise UserError(f'{path}: architecture {obj["arch"]!r} is not one of {", ".join(ARCHS)}')
    backbone, width = make_backbone(obj['arch'])
    model = Classifier(backbone, width, len(obj['classes']))
    try:
        model.load_state_dict(obj['model'])
    except RuntimeError as e:
        guess = _guess_arch([k[len('backbone.'):] for k in obj['model']
                             if k.startswith('backbone.')])
        lines = str(e).strip().splitlines()  # a heading, then one line per problem
        detail = lines[min(1, len(lines) - 1)].strip()[:160]
        why = f'its weights are a {guess}\'s' if guess and guess != obj['arch'] else detail
        raise UserError(f'{path}: its weights do not fit a {obj["arch"]} classifier of '
                        f'{len(obj["classes"])} classes ({why})')
    return model.eval(), {k: v for k, v in obj.items() if k != 'model'}


def classifier_views(info, tta=None):
    """The views of a classifier file's test-time passes, as finetune.py's test: the eval view,
    then tta - 1 passes of the fine-tuning view (tta: the file's unless given)."""
    norm = dict(size=info['size'], mean=info['mean'], std=info['std'])
    view = preset_params(info['aug'], **norm)[0]
    return [preset_params('eval', **norm)[0]] + [view] * ((tta or info['tta']) - 1)


def predict_images(rt, model, info, ds, out, *, ids=None, tta=None, batch_size=None,
                   cache_dir='cache', workers=2, skip_bad=False):
    """Classify the images of ds (those of `ids`, in that order, when given) with a
    load_classifier pair and write the CSV `out`: id, predicted class, one probability column
    per class. When the images are labelled with class names the model knows, the metrics
    (classification_metrics) are printed and returned, else None. The random passes are drawn
    as in fine-tuning (its seed and, unless given, its batch size), so the test part of the
    split it was fine-tuned on gives its result row's metrics. Nothing is written on error."""
    out, views = str(out), classifier_views(info, tta)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or (os.path.isdir(folder) and not os.access(folder, os.W_OK)):
        raise UserError(f'--out {out}: not a file that can be written; name one such as '
                        f'preds.csv in a writable folder')
    cache = build_cache(ds, info['cache_size'], cache_dir, workers, skip_bad)
    positions = cache_positions(cache, ds['ids'] if ids is None else ids)
    if not positions:
        raise UserError(f'--data {ds["root"]}: no readable image to classify')
    _, raw = wrap_model(rt, model)
    raw.eval()
    probs, labels = predict(rt, raw, cache, positions, batch_size or info['batch_size'], views,
                            softmax=True, seed=info['seed'], workers=workers)
    classes, labels = info['classes'], labels.tolist()
    rows = [[cache['ids'][k], classes[c], *(f'{p:.9g}' for p in ps)]  # 9 digits: float32
            for k, c, ps in zip(positions, probs.argmax(1).tolist(), probs.tolist())]
    known = [k for k, l in enumerate(labels) if l >= 0]
    names = {ds['classes'][labels[k]] for k in known}
    metrics = None
    if known and names <= set(classes):  # labels by class name: the model's order may differ
        index = {c: k for k, c in enumerate(classes)}
        y = torch.tensor([index[ds['classes'][labels[k]]] for k in known])
        metrics = classification_metrics(probs[known], y, len(classes))
    atomic_write(out, lambda f: csv.writer(f, lineterminator='\n').writerows(
        [['id', 'predicted', *classes], *rows]))
    print0(f'{out}: {len(rows)} images, {len(classes)} classes, {len(views)} test-time '
           f'pass(es)')
    if metrics:
        print0(f'accuracy {metrics["accuracy"]:.4f} balanced {metrics["balanced_accuracy"]:.4f}'
               f' macro-F1 {metrics["macro_f1"]:.4f} ({len(known)} labelled images)')
    elif names:
        print0(f'note: the classes {few(sorted(names - set(classes)))} of these images are not '
               f'the model\'s ({few(classes)}): no metrics')
    return metrics


# --------------------------------------------------------------------------- command line tools
def _cli(argv=None):
    """python common.py split --data PATH --protocol paper [--per-class 500] [--out FILE]
    python common.py cache --data PATH --cache-size 256    (decode once, ahead of training)
    python common.py predict --model FILE --data PATH --out preds.csv [--tta N]
        [--split FILE --part test]    (a finetune.py --save-model classifier on any images)"""
    p = argparse.ArgumentParser(prog='common.py', description=_cli.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('split', help='make a split file, once, for every script to reuse')
    c = sub.add_parser('cache', help='build the uint8 cache of a dataset')
    r = sub.add_parser('predict', help='classify images with a fine-tuned model file')
    for q in (s, c, r):
        q.add_argument('--data', required=True)
        q.add_argument('--format', default='auto', choices=['auto'] + list(READERS))
        q.add_argument('--drop-downsampled', action='store_true',
                       help='ISIC 2019: remove the downsampled duplicates, as the paper')
    s.add_argument('--protocol', default='random', choices=list(SPLIT_RULES))
    s.add_argument('--per-class', type=per_class_arg, default=500,
                   help="paper: labelled images kept per class: a number, CLASS=N,... for each "
                        "class, or paper (the paper's ISIC 2019 counts, 2,554 images)")
    s.add_argument('--test-fraction', type=number(float, 0, 0.99), default=0.2,
                   help='random: test share')
    s.add_argument('--val-fraction', type=number(float, 0, 0.99), default=0.1,
                   help='validation share (paper: of the non-kept images)')
    s.add_argument('--seed', type=number(int, 0, MAX_SEED), default=0)
    s.add_argument('--extra', action='append', default=[],
                   help='extra unlabelled folder for the pretraining pool (repeatable)')
    s.add_argument('--out', default=None, help='default: splits/<dataset>-<protocol>.json')
    c.add_argument('--cache-size', type=number(int, 8, MAX_SIDE), default=256)
    c.add_argument('--cache-dir', default='cache')
    c.add_argument('--workers', type=number(int, 0, 256), default=default_workers())
    c.add_argument('--skip-bad', action='store_true')
    r.add_argument('--model', required=True, help='DIR/<init-name>-seed<N>.pt of finetune.py '
                   '--save-model DIR')
    r.add_argument('--out', required=True, help='CSV: id, predicted, a probability per class')
    r.add_argument('--split', default=None, help='score one part of this split file only')
    r.add_argument('--part', default=None, choices=['train', 'val', 'test', 'pretrain'],
                   help='with --split (default: the part its fine-tuning scored, test unless '
                        '--eval-part val): its fine-tuning figures come back')
    r.add_argument('--tta', type=number(int, 1), default=None,
                   help='test-time passes (default: the fine-tuning run\'s)')
    r.add_argument('--batch-size', type=number(int, 1), default=None,
                   help='default: the fine-tuning run\'s (the random passes draw per batch)')
    r.add_argument('--cache-dir', default='cache')
    r.add_argument('--skip-bad', action='store_true', help='leave unreadable images out')
    add_runtime_args(r)
    args = p.parse_args(argv)
    if args.cmd == 'predict' and args.part and not args.split:
        p.error('--part needs --split')
    if args.cmd == 'cache':
        check_writable(args.cache_dir, '--cache-dir')
    elif args.out:
        check_writable(args.out, '--out', 'file')
    ds = read_dataset(args.data, args.format, drop_downsampled=args.drop_downsampled)
    if args.cmd == 'predict':
        model, info = load_classifier(args.model)
        part = args.part or info['result'].get('eval_part', 'test')  # the part it was scored on
        ids = load_split(args.split, ds)[part] if args.split else None
        predict_images(setup_runtime(args.device, args.precision), model, info, ds, args.out,
                       ids=ids, tta=args.tta, batch_size=args.batch_size,
                       cache_dir=args.cache_dir, workers=args.workers, skip_bad=args.skip_bad)
        return
    if args.cmd == 'cache':
        cache = build_cache(ds, args.cache_size, args.cache_dir, args.workers, args.skip_bad)
        print(f'{cache["file"]}: {len(cache["ids"])} images of {args.cache_size} px')
        return
    split = make_split(ds, args.protocol, args.seed, args.per_class, args.test_fraction,
                       args.val_fraction, args.extra)
    out = args.out or split_path(ds, args.protocol)
    save_split(out, split)
    counts = split['how']['counts']
    print(f'{out}: ' + ', '.join(f'{k} {len(split[k])}' for k in ('train', 'val', 'test',
                                                                   'pretrain')))
    for part in ('train', 'val', 'test'):
        print(f'  {part}: ' + ' '.join(f'{c} {n}' for c, n in counts[part].items()))


if __name__ == '__main__':
    main_guard(_cli)
