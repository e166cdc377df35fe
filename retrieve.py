"""Retrieve the top-k gallery images for one query with a trained checkpoint.

    python retrieve.py --checkpoint=runs/.../best_checkpoint.pth --dataset_path=DIR \\
        --query_img=photo.png --query_text="make top-left object red" --topk=10 --out=results.png
    python retrieve.py --checkpoint=... --dataset_path=DIR --query_index=123      # a test query

The gallery is every image of --split (default test), ranked as that dataset's retrieval test
ranks it: a FashionIQ test query against its category's gallery (the candidate kept under
--fiq_protocol=split, left out under val), a Shoes test query against its --shoes_protocol's
gallery with its reference ranked last (score -inf, as VAL's and ARTEMIS's code), every other test
query with its source image left out.  The gallery's features are computed
once and cached on disk, so later queries against the same checkpoint and split take a second or
so.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time

import PIL.Image
import torch
import torchvision

import checkpoints
import cirr
import datasets
import fashioniq
import img_text_composition_models
import model_registry
import experiment
import main
import paper_composers
import retrieval_grid
import shoes
import test_retrieval
import text_model

MAX_DRAWN = 50  # results drawn in the --out picture
CACHE_FORMAT = 2  # 2: the key holds every image file's size and mtime


def get_args_parser():
    p = argparse.ArgumentParser(
        description='Top-k retrieval for one query (an image and a modification text) with a '
                    'TIRG checkpoint; prints rank, score, caption and file of each result.',
        epilog='examples:\n'
               '  retrieve.py --checkpoint=runs/RUN/best_checkpoint.pth --dataset_path=DIR \\\n'
               '      --query_img=scene.png --query_text="make top-left object red" --out=top10.png\n'
               '  retrieve.py --checkpoint=runs/RUN/best_checkpoint.pth --query_index=123 --topk=5\n'
               '\nThe first query of a checkpoint and split computes the features of every gallery '
               'image\nand caches them (--cache_dir); later ones read them back in a moment.',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', type=str, required=True,
                   help='model checkpoint (ours or the released format)')
    p.add_argument('--dataset', type=str, default=None, choices=list(experiment.DATASET_CLASSES),
                   help="gallery dataset (default: the checkpoint's, else css3d)")
    p.add_argument('--dataset_path', type=str, default=None,
                   help="dataset root (default: the checkpoint's --dataset_path; an error when "
                        "that folder is not here)")
    p.add_argument('--split', type=str, default='test', choices=['train', 'test', 'test1'],
                   help='split whose images form the gallery and whose test queries '
                        '--query_index counts (default: test; FashionIQ\'s and CIRR\'s test is their '
                        'val files; test1: CIRR\'s test1, whose queries have no known target)')
    experiment.add_photo_benchmark_flags(
        p, None, "FashionIQ categories in the gallery (default: the checkpoint's, else all)",
        shoes_protocol_default=None, shoes_protocol_help="(default: the checkpoint's, else val)",
        fiq_protocol_default=None, fiq_protocol_help="(default: the checkpoint's, else split)")
    p.add_argument('--css_query_images', type=str, default=None, choices=['3d', '2d'],
                   help="CSS: test queries' source images (--query_index): '3d' the PNGs or '2d' "
                        "the 2D drawings (2D->3D); the gallery is the PNGs either way (default: "
                        "the checkpoint's, else 3d)")
    p.add_argument('--model', type=str, default=None,
                   choices=list(model_registry.MODELS),
                   help="composition model (default: the checkpoint's)")
    p.add_argument('--embed_dim', type=int, default=None, help="embedding size (default: the checkpoint's)")
    p.add_argument('--img_backbone', type=str, default=None,
                   choices=list(img_text_composition_models.BACKBONES),
                   help="image encoder (default: the checkpoint's; resnet18 for the released ones)")
    query = p.add_argument_group('query: --query_img with --query_text, or --query_index')
    query.add_argument('--query_img', type=str, default=None,
                       help="query image file, brought to the size the model sees the dataset's "
                            "images at: Resize + CenterCrop to 224 on the photo datasets, scaled "
                            "to cover the CSS images' size and its centre cut out on CSS "
                            "(default: none)")
    query.add_argument('--query_text', type=str, default=None, help='modification text')
    query.add_argument('--query_index', type=int, default=None,
                       help="the N-th test query of --split (from 0): its source image and text, "
                            "and its known target, ranked as the retrieval test ranks it (the "
                            "source image left out; FashionIQ: its category's gallery, the "
                            "candidate kept under --fiq_protocol=split; CIRR: its image set "
                            "ranked as well; Shoes: its protocol's gallery, the "
                            "reference ranked last)")
    p.add_argument('--topk', type=int, default=10,
                   help=f'number of results (default: 10); the --out picture shows the first '
                        f'{MAX_DRAWN}, {retrieval_grid.MAX_COLUMNS} to a line')
    p.add_argument('--out', type=str, default=None,
                   help='write a picture (PNG) of the query and its results here; the correct '
                        'target, when known, is framed in green')
    p.add_argument('--cache_dir', type=str, default=None,
                   help='folder for cached gallery features (default: feature_cache/ next to the '
                        'checkpoint); a cache is used only while the checkpoint file (path, size, '
                        'mtime) and the dataset split (its data files and every image file: size '
                        'and mtime) are unchanged; a cache that cannot be written is a warning')
    p.add_argument('--no_cache', action='store_true', help='neither read nor write cached features')
    p.add_argument('--device', type=str, default='auto',
                   help='auto (the default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps')
    p.add_argument('--batch_size', type=int, default=32, help='batch size for gallery features (default: 32)')
    p.add_argument('--loader_num_workers', type=int, default=4,
                   help='DataLoader workers for gallery features (default: 4)')
    return p


def parse_opt(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opt = get_args_parser().parse_args(argv)
    opt.explicit_flags = main.explicit_flags(argv)
    return opt


def check_opt(opt):
    for name in ('batch_size', 'topk'):
        if getattr(opt, name) < 1:
            raise experiment.UserError(f'--{name}={getattr(opt, name)}: expected a positive integer')
    if opt.embed_dim is not None and not 1 <= opt.embed_dim <= main.MAX_EMBED_DIM:
        raise experiment.UserError(f'--embed_dim={opt.embed_dim}: expected a positive integer up '
                                   f'to {main.MAX_EMBED_DIM}')
    if opt.loader_num_workers < 0:
        raise experiment.UserError(f'--loader_num_workers={opt.loader_num_workers}: expected 0 or more')
    if opt.query_index is not None:
        if opt.query_img is not None or opt.query_text is not None:
            raise experiment.UserError('give either --query_index or --query_img with --query_text, not both')
        if opt.query_index < 0:
            raise experiment.UserError(f'--query_index={opt.query_index}: expected 0 or more')
    elif opt.query_img is None or opt.query_text is None:
        raise experiment.UserError('no query: give --query_img=PATH and --query_text=TEXT, or --query_index=N')
    if opt.query_img is not None and not os.path.isfile(opt.query_img):
        raise experiment.UserError(f'--query_img={opt.query_img}: no such file')
    if opt.out is not None:
        folder = os.path.dirname(os.path.abspath(opt.out))
        if not os.path.isdir(folder):
            raise experiment.UserError(f'--out={opt.out}: no such folder {folder}')


def adopt_checkpoint_dataset(opt, ckpt):
    """--dataset and --dataset_path from the checkpoint's options when not given.  A dataset
    folder the checkpoint names but that is not here is an error, never another dataset (such as
    the default one) in its place; the folder taken is said on stderr."""
    saved = ckpt.get('opt')
    saved_dataset = getattr(saved, 'dataset', None)
    if opt.dataset is None:
        opt.dataset = saved_dataset or 'css3d'
    elif isinstance(saved_dataset, str) and saved_dataset != opt.dataset:
        # Its words and features are another dataset's: the ranking would be meaningless.
        raise experiment.UserError(f'--dataset={opt.dataset}: {opt.checkpoint} was trained on '
                                   f'{saved_dataset}; give --dataset={saved_dataset} (or leave '
                                   f'--dataset out) to search with it')
    if opt.fiq_category is None:
        opt.fiq_category = getattr(saved, 'fiq_category', 'all') if saved_dataset == opt.dataset else 'all'
    if opt.shoes_protocol is None:
        opt.shoes_protocol = getattr(saved, 'shoes_protocol', 'val') if saved_dataset == opt.dataset else 'val'
    if opt.fiq_protocol is None:
        opt.fiq_protocol = getattr(saved, 'fiq_protocol', 'split') if saved_dataset == opt.dataset else 'split'
    if opt.split == 'test1' and opt.dataset != 'cirr':
        raise experiment.UserError(f'--split=test1: only CIRR has a test1 split (the dataset here '
                                   f'is {opt.dataset})')
    if opt.dataset_path is not None:
        return
    saved_path = getattr(saved, 'dataset_path', None)
    if saved_dataset != opt.dataset or not saved_path:
        raise experiment.UserError(f'--dataset_path: not given, and {opt.checkpoint} names no '
                                   f'{opt.dataset} dataset folder; give --dataset_path=DIR')
    relative = '' if os.path.isabs(saved_path) else (
        f', relative to the folder training ran in; here it means {os.path.abspath(saved_path)}')
    if not os.path.isdir(saved_path):
        raise experiment.UserError(f'--dataset_path: not given, and the checkpoint\'s dataset folder '
                                   f'{saved_path} is not here{relative}; give --dataset_path=DIR')
    opt.dataset_path = os.path.abspath(saved_path)
    print(f'Dataset: {opt.dataset} at {opt.dataset_path} (the checkpoint\'s --dataset_path'
          f'{relative})', file=sys.stderr)


def load_model_and_gallery(opt):
    """The checkpoint's model (eval mode, on opt.device) and the gallery dataset, as main.py
    loads them.  main.py's progress lines are dropped: stdout is for the results."""
    with contextlib.redirect_stdout(io.StringIO()):
        ckpt = main.load_checkpoint(opt.checkpoint)
        experiment.check_architecture_flags(opt, ckpt, opt.checkpoint)
        adopt_checkpoint_dataset(opt, ckpt)
        experiment.adopt_checkpoint_query_images(opt, ckpt)
        opt.css_query_images = opt.css_query_images or '3d'
        for name in ('model', 'embed_dim'):  # main.py's defaults when neither given nor saved
            if getattr(opt, name) is None:
                setattr(opt, name, main.get_args_parser().get_default(name))
        experiment.adopt_checkpoint_architecture(opt, ckpt)
        experiment.check_model_fits_dataset(opt)
        device = experiment.select_device(opt.device)
        opt.fast_decode = False  # exact pixels
        trainset, testset = experiment.load_dataset(opt, 'test1' if opt.split == 'test1' else 'test')
        vocab = experiment.build_vocabulary(opt, ckpt, opt.checkpoint, trainset)
        opt.img_weights = 'none'  # every weight comes from the checkpoint
        model = experiment.create_model(opt, trainset.get_all_texts(), vocab)
        experiment.load_model_weights(model, ckpt, opt.checkpoint)
    model = model.to(device).eval()
    return model, (trainset if opt.split == 'train' else testset)


# ---------------------------------------------------------------------------------------------
# Gallery features, cached on disk.

def _stat(path):
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), None, None]


def _data_files(dataset):
    """The files besides the images whose change means the split may have changed."""
    root = dataset.path
    if isinstance(dataset, datasets.CSSDataset):
        return [os.path.join(root, datasets.CSS_DATA_FILE)]
    if isinstance(dataset, datasets.Fashion200k):
        labels = os.path.join(root, 'labels')
        return [os.path.join(labels, f) for f in sorted(os.listdir(labels)) if dataset.split in f]
    if isinstance(dataset, fashioniq.FashionIQ):
        return [f(root, category, dataset.file_split) for category in dataset.categories
                for f in (fashioniq.captions_file, fashioniq.split_file)]
    if isinstance(dataset, cirr.CIRR):
        return [dataset.captions_path, dataset.split_path]
    if isinstance(dataset, shoes.Shoes):
        return [os.path.join(root, shoes.CAPTIONS_FILE), shoes.list_path(root, dataset.split)]
    return []


def images_digest(dataset):
    """sha1 over every gallery image: its caption and its file's path, size and mtime (one stat
    each), so that an image overwritten in place invalidates the cache; drawn CSS images have no
    file (the data file's entry covers them)."""
    digest = hashlib.sha1()
    for i, img in enumerate(dataset.imgs):
        path = dataset.image_file(i) if hasattr(dataset, 'image_file') else None
        file_key = _stat(path) if path else None
        digest.update(json.dumps([i, img['captions'][0], file_key]).encode('utf-8', 'replace'))
        digest.update(b'\n')
    return digest.hexdigest()


def cache_key(opt, dataset):
    return {
        'format': CACHE_FORMAT,
        'checkpoint': _stat(opt.checkpoint),
        'model': opt.model, 'embed_dim': opt.embed_dim,
        'dataset': opt.dataset, 'dataset_path': os.path.abspath(opt.dataset_path),
        'split': dataset.split,
        'data_files': [_stat(f) for f in _data_files(dataset)],
        'css_drawn_2d': getattr(dataset, 'img_path', '') is None,
        'num_images': len(dataset.imgs),
        'images': images_digest(dataset),
    }


def cache_path(opt):
    folder = opt.cache_dir or os.path.join(os.path.dirname(os.path.abspath(opt.checkpoint)),
                                           'feature_cache')
    # One file per (checkpoint file, dataset split): a newer checkpoint or changed data overwrite it.
    galleries = {'fashioniq': [opt.fiq_category, opt.fiq_protocol],
                 'shoes': [opt.shoes_protocol]}.get(opt.dataset, [])
    name = hashlib.sha1(json.dumps([os.path.abspath(opt.checkpoint), opt.dataset,
                                    os.path.abspath(opt.dataset_path)] + galleries).encode()).hexdigest()[:16]
    return os.path.join(folder, f'gallery_{opt.dataset}_{opt.split}_{name}.pt')


def read_cache(path, key):
    if not os.path.isfile(path):
        return None
    try:
        cached = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated or foreign file: recompute
        print(f'warning: {path}: unreadable feature cache ({type(e).__name__}); recomputing',
              file=sys.stderr)
        return None
    if not isinstance(cached, dict) or cached.get('key') != key:
        return None
    return cached['features']


def write_cache(path, key, features):
    """Best effort: a cache that cannot be written (a full disk, a read-only folder) is a warning,
    and the query's results are printed all the same."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpoints.save_atomic({'key': key, 'features': features.cpu()}, path)
    except OSError as e:  # save_atomic's CheckpointWriteError names the file
        reason = str(e) if isinstance(e, checkpoints.CheckpointWriteError) else f'{path}: {e.strerror or e}'
        print(f'warning: feature cache not written ({reason}); --cache_dir=DIR puts it elsewhere',
              file=sys.stderr)
        return False
    return True


def gallery_features(opt, model, dataset):
    """L2-normalised features of every image of `dataset`, from the cache when it is current."""
    device = test_retrieval.model_device(model)
    key = path = None
    if not opt.no_cache:
        key, path = cache_key(opt, dataset), cache_path(opt)
        features = read_cache(path, key)
        if features is not None and features.shape[0] == len(dataset.imgs):
            print(f'Gallery features: {path} (cached)', file=sys.stderr)
            return features.to(device)
    tic = time.time()
    print(f'Computing gallery features of the {len(dataset.imgs)} {dataset.split} images',
          file=sys.stderr)
    features = test_retrieval.compute_gallery_features(model, dataset, opt.batch_size,
                                                       opt.loader_num_workers)
    features = torch.nn.functional.normalize(features, dim=1)
    if path is not None and write_cache(path, key, features):
        print(f'Gallery features: {path} (written, {time.time() - tic:.1f}s)', file=sys.stderr)
    return features


# ---------------------------------------------------------------------------------------------
# The query.

def image_name(dataset, idx):
    """What the results call an image: its file, or css_<split>_<index> for drawn CSS images."""
    idx = int(idx)
    if isinstance(dataset, datasets.CSSDataset) and dataset.img_path is None:
        return 'css_%s_%06d' % (dataset.split, idx)
    if hasattr(dataset, 'image_file'):
        return dataset.image_file(idx)
    return dataset.imgs[idx].get('file_path', str(idx))


def image_files(dataset):
    """{absolute file: index} of the gallery's image files (none for drawn CSS images)."""
    if isinstance(dataset, datasets.CSSDataset) and dataset.img_path is None:
        return {}
    return {os.path.realpath(image_name(dataset, i)): i for i in range(len(dataset.imgs))}


def query_from_index(dataset, n):
    queries = dataset.get_test_queries()
    if not queries:
        raise experiment.UserError(f'--query_index: the {dataset.split} split has no test queries')
    if n >= len(queries):
        raise experiment.UserError(f'--query_index={n}: out of range (the {dataset.split} split has '
                             f'{len(queries)} test queries, 0 to {len(queries) - 1})')
    q = queries[n]
    source = int(q['source_img_id'])
    name = f'test query {n} of the {dataset.split} split'
    if 'category' in q:
        name += f' ({q["category"]})'
    if 'pairid' in q:
        name += f' (pairid {q["pairid"]})'
    return {'text': q['mod']['str'], 'source_id': source,
            'display': retrieval_grid.display_query_image(dataset, source),
            'target_caption': q['target_caption'], 'target_id': q.get('target_img_id'),
            'category': q.get('category'), 'subset_ids': q.get('subset_ids'),
            'name': f'{name}: image {image_name(dataset, source)}'}


def css_image_size(dataset):
    """(height, width) of a CSS split's images: all one size, which the CSS transform keeps."""
    img = dataset.get_img(0, raw_img=True)  # a PNG, or a drawing (an H x W x 3 array)
    return (img.height, img.width) if isinstance(img, PIL.Image.Image) else tuple(img.shape[:2])


def at_dataset_scale(dataset, img):
    """A user's image at the size the model sees the dataset's own images: the photo datasets'
    transform resizes it (Resize + CenterCrop); CSS's resizes nothing (SPEC 2), so a CSS query
    is scaled to cover the gallery images' size and its centre cut out, as Resize + CenterCrop
    do.  At another scale its features would not be comparable with the gallery's, and the
    composers reading the layer4 map would see more cells (relationship's memory grows with the
    square of their count)."""
    if not isinstance(dataset, datasets.CSSDataset):
        return img
    height, width = css_image_size(dataset)
    if (img.height, img.width) == (height, width):
        return img
    scale = max(height / img.height, width / img.width)
    size = [max(height, round(img.height * scale)), max(width, round(img.width * scale))]
    resized = torchvision.transforms.functional.resize(img, size, antialias=True)
    return torchvision.transforms.functional.center_crop(resized, [height, width])


def query_from_file(opt, dataset):
    img = datasets.open_photo(opt.query_img)  # ImageReadError (a DatasetError) when unreadable
    img = at_dataset_scale(dataset, img)
    source = image_files(dataset).get(os.path.realpath(opt.query_img))
    if source is not None and keeps_source(dataset):
        print(f'The query image is gallery image {source}: kept in the results, as in the '
              f'FashionIQ split protocol', file=sys.stderr)
    elif source is not None and ranks_source_last(dataset):
        print(f'The query image is gallery image {source}: ranked last (score -inf), as in the '
              f'Shoes protocols', file=sys.stderr)
    elif source is not None:
        print(f'The query image is gallery image {source}: left out of the results, as in the '
              f'retrieval protocol', file=sys.stderr)
    return {'text': opt.query_text, 'source_id': source, 'display': img,
            'tensor': dataset.transform(img) if dataset.transform else img,
            'target_caption': None, 'target_id': None, 'name': f'image {opt.query_img}'}


@torch.inference_mode()
def query_feature(model, dataset, query):
    if 'tensor' in query:
        imgs = torch.as_tensor(query['tensor']).float().unsqueeze(0).to(test_retrieval.model_device(model))
        feature = model.compose_img_text(imgs, [query['text']]).float()
    else:  # a test query: exactly the retrieval test's code path
        q = {'source_img_id': query['source_id'], 'mod': {'str': query['text']}}
        feature = test_retrieval.compute_query_features(model, dataset, [q], 1)
    return torch.nn.functional.normalize(feature, dim=1)


def keeps_source(dataset):
    """FashionIQ's split protocol ranks the candidate with the rest of its gallery (SPEC 2.4);
    its val protocol (VAL's code ranks the candidate last) and every other dataset's leave the
    query's source image out."""
    return isinstance(dataset, fashioniq.FashionIQ) and dataset.protocol == 'split'


def ranks_source_last(dataset):
    """Shoes' protocols rank the reference last rather than leaving it out (SPEC 2.6), so a
    query whose target is its reference finds it once --topk reaches the gallery's size."""
    return isinstance(dataset, shoes.Shoes)


def protocol_gallery(dataset, query):
    """(gallery ids, or None for every image; source id to leave out, or None) for `query`, as
    the dataset's retrieval test ranks it: a FashionIQ test query against its category's gallery."""
    ids = dataset.galleries[query['category']] if query.get('category') is not None else None
    if query['source_id'] is None or keeps_source(dataset):
        return ids, None
    return ids, query['source_id']


def rank_gallery(feature, gallery, topk, ids, exclude, exclude_ranks_last=False):
    """(scores, gallery indices) of the top-k among `ids` (all when None), `exclude` left out
    (or ranked last, scored -inf, with `exclude_ranks_last`)."""
    if ids is None:
        scores, indices = test_retrieval.top_k_with_scores(
            feature, gallery, topk, None if exclude is None else [exclude], exclude_ranks_last)
        return scores[0].tolist(), indices[0].tolist()
    position = {idx: i for i, idx in enumerate(ids)}
    scores, positions = test_retrieval.top_k_with_scores(
        feature, gallery[torch.as_tensor(ids, device=gallery.device)], topk,
        None if exclude is None else [position[exclude]], exclude_ranks_last)
    return scores[0].tolist(), [ids[i] for i in positions[0].tolist()]


def subset_ranking(feature, gallery, subset_ids):
    """CIRR's recall_subset ranking: [(score, id)] of the image set's members other than the
    reference, best first."""
    scores = (feature @ gallery[torch.as_tensor(subset_ids, device=gallery.device)].t())[0].tolist()
    return sorted(zip(scores, subset_ids), key=lambda pair: -pair[0])


def check_query_text(model, text):
    """attribute_operator composes one adjective (MIT-States); a sentence is a user mistake."""
    if isinstance(model, paper_composers.AttributeOperator):
        try:
            word = paper_composers.adjective_word(text)
        except ValueError as e:
            raise experiment.UserError(f'--query_text={text!r}: {e}') from None
        if word is None:
            print(f'warning: --query_text={text!r} is no word once tokenised (non-ASCII letters '
                  f'and punctuation are dropped): no operator, the query is the image\'s feature',
                  file=sys.stderr)


def warn_unknown_words(model, text):
    vocab = model.text_model.vocab
    unknown = [w for w in text_model.tokenize_text(text) if w not in vocab.word2id]
    if unknown:
        print(f'warning: not in the model\'s vocabulary (read as <UNK>): {" ".join(unknown)}',
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------

def retrieve(opt):
    """Load, rank and print; returns (query, results): results are dicts with rank, index, score,
    caption, file and correct."""
    check_opt(opt)
    model, dataset = load_model_and_gallery(opt)
    if opt.query_index is not None:
        query = query_from_index(dataset, opt.query_index)
    else:
        query = query_from_file(opt, dataset)
    check_query_text(model, query['text'])
    warn_unknown_words(model, query['text'])
    gallery = gallery_features(opt, model, dataset)
    feature = query_feature(model, dataset, query).to(gallery.device)
    scores, indices = rank_gallery(feature, gallery, opt.topk, *protocol_gallery(dataset, query),
                                   exclude_ranks_last=ranks_source_last(dataset))
    if query.get('subset_ids'):
        query['subset'] = subset_ranking(feature, gallery, query['subset_ids'])
    results = []
    for rank, (score, idx) in enumerate(zip(scores, indices), 1):
        caption = dataset.imgs[idx]['captions'][0]
        results.append({'rank': rank, 'index': idx, 'score': score, 'caption': caption,
                        'file': image_name(dataset, idx),
                        'correct': query['target_caption'] is not None and caption == query['target_caption']})
    print_results(query, results, dataset)
    if opt.out:
        write_picture(opt.out, dataset, query, scores, indices)
    return query, results


def write_picture(out, dataset, query, scores, indices):
    """The query and its first MAX_DRAWN results, MAX_COLUMNS to a line: --topk=379 would
    otherwise be a picture 51,704 pixels wide."""
    drawn = min(len(indices), MAX_DRAWN)
    row = retrieval_grid.result_row(dataset, query['display'], query['text'], scores[:drawn],
                                    indices[:drawn], query['target_caption'], target_note(query))
    picture = retrieval_grid.draw_rows([row])
    try:
        picture.save(out, format='PNG')
    except (OSError, ValueError) as e:
        raise experiment.UserError(f'--out={out}: cannot write ({e})') from None
    shown = '' if drawn == len(indices) else f' (the first {drawn} of the {len(indices)} results)'
    print(f'Wrote {out}{shown}', file=sys.stderr)


def target_note(query):
    return None if query['target_caption'] is None else f'target: {query["target_caption"]}'


def print_results(query, results, dataset):
    print(f'Query: {query["name"]}, text "{query["text"]}"')
    if query['target_caption'] is not None:
        target = ('' if query.get('target_id') is None
                  else f' (image {image_name(dataset, query["target_id"])})')
        print(f'Target caption: {query["target_caption"]}{target}')
    width = max([len('caption')] + [len(r['caption']) for r in results])
    print(f'{"rank":>4}  {"score":>7}  {"caption":<{width}}  file')
    for r in results:
        mark = '  <- target' if r['correct'] else ''
        print(f'{r["rank"]:>4}  {r["score"]:>7.4f}  {r["caption"]:<{width}}  {r["file"]}{mark}')
    if query.get('subset'):
        print('Within its image set (CIRR recall_subset): ' + ', '.join(
            f'{dataset.imgs[idx]["captions"][0]} {score:.4f}'
            + (' <- target' if dataset.imgs[idx]['captions'][0] == query['target_caption'] else '')
            for score, idx in query['subset']))


def main_cli(argv=None):
    opt = parse_opt(argv)
    try:
        retrieve(opt)
        return 0
    except (experiment.UserError, datasets.DatasetError, checkpoints.CheckpointError) as e:
        print(f'retrieve.py: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\nAborted.', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main_cli())
