"""What main.py, retrieve.py and bench.py share: the device, the datasets, and a model built from
flags or a checkpoint.  One-line user errors are `UserError`."""
import contextlib
import importlib
import os
import random
import sys

import numpy as np
import torch

import amp
import checkpoints
import datasets
import distributed
import img_text_composition_models
import model_registry
import paper_composers
import text_model

DEFAULT_DATASET_PATH = os.path.join('.', 'data', 'css_synth')


class UserError(Exception):
    """A mistake in the command line or the data: reported as one line, no traceback."""


def select_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device={name}: expected auto, cpu, cuda, cuda:N or mps') from None
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f'--device={name}: expected auto, cpu, cuda, cuda:N or mps')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device={name}: CUDA is not available on this machine')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f'--device={name}: this machine has {torch.cuda.device_count()} CUDA devices')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f'--device={name}: MPS is not available on this machine')
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def choose_precision(opt, device, resume_ckpt=None):
    """opt.precision: what --amp computes in on this device (amp.choose), said in one line at
    start where it is float32 after all, and the same as the resumed run's.  Under torchrun every
    process decides (a bad TIRG_CPU_BF16 is an error on each) and all take the first process's
    decision, so the processes compute alike even on machines that differ."""
    try:
        decision = amp.choose(opt.amp, device.type)
    except amp.PrecisionSettingError as e:
        raise UserError(str(e)) from None
    opt.precision, notice = distributed.broadcast_object(decision)
    if notice:
        distributed.print0(notice)
    if resume_ckpt is not None:
        checkpoints.check_resume_precision(opt, resume_ckpt)


def seed_process(opt, rank):
    """Training examples draw from generators keyed by their position (datasets.DrawKey), not
    from these.  torch's stream (dropout, the loss's triplet negatives) is seed + rank: each
    process's slice of the batch gets its own dropout masks (SPEC 9), and the triplets are the
    first process's on every process (distributed.from_first_process)."""
    seed_everything(opt.seed)
    torch.manual_seed(opt.seed + rank)


def is_default_dataset(opt):
    return (opt.dataset == 'css3d' and
            os.path.abspath(opt.dataset_path) == os.path.abspath(DEFAULT_DATASET_PATH))


def ensure_default_dataset(opt):
    """Generate the synthetic CSS data when the default dataset folder holds none."""
    if not is_default_dataset(opt):
        return
    if os.path.isfile(os.path.join(opt.dataset_path, datasets.CSS_DATA_FILE)):
        return
    import make_css_dataset
    # A record without the data file: the unfinished work of an earlier version of the generator
    # (this one moves a complete dataset into place); --overwrite replaces only its own files.
    unfinished = os.path.isfile(os.path.join(opt.dataset_path, make_css_dataset.MANIFEST))
    if unfinished:
        print(f'{opt.dataset_path}: holds an unfinished synthetic CSS dataset (no data file): '
              f'generating it again (make_css_dataset.py, replacing only the files it wrote)')
    else:
        print(f'No dataset in {opt.dataset_path}: generating synthetic CSS data there (make_css_dataset.py)')
    make_css_dataset.generate_css_dataset(opt.dataset_path, overwrite=unfinished)


DATASET_CLASSES = {
    'css3d': ('datasets', 'CSSDataset'),
    'fashion200k': ('datasets', 'Fashion200k'),
    'mitstates': ('datasets', 'MITStates'),
    'fashioniq': ('fashioniq', 'FashionIQ'),
    'cirr': ('cirr', 'CIRR'),
    'shoes': ('shoes', 'Shoes'),
}


def add_photo_benchmark_flags(parser, category_default, category_help, shoes_protocol_default='val',
                              shoes_protocol_help='(default: %(default)s)', fiq_protocol_default='split',
                              fiq_protocol_help='(default: %(default)s)'):
    """--fiq_category, --fiq_protocol, --shoes_protocol and --skip_missing_images, as main.py and
    retrieve.py take them (some defaults and meanings differ: a run's, or a checkpoint's)."""
    parser.add_argument('--fiq_category', type=str, default=category_default,
                        choices=['dress', 'shirt', 'toptee', 'all'], help=category_help)
    parser.add_argument('--fiq_protocol', type=str, default=fiq_protocol_default, choices=['split', 'val'],
                        help="FashionIQ examples, queries and gallery: 'split' (a triplet's two "
                             "captions joined; gallery = every image of split.<category>.val.json, "
                             "the candidate kept, as CoSMo and CLIP4Cir) or 'val' (VAL's code: one "
                             "example or query per caption of the triplets whose two images exist; "
                             "gallery = those images, the candidate ranked last) " + fiq_protocol_help)
    parser.add_argument('--shoes_protocol', type=str, default=shoes_protocol_default,
                        choices=['val', 'unique'],
                        help="Shoes triplets and gallery: 'val' (every triplet touching each "
                             "listed name, gallery = the eval list plus the queries' images, as the "
                             "VAL paper) or 'unique' (triplets with both images listed, gallery = "
                             "the eval list, as ARTEMIS) " + shoes_protocol_help)
    parser.add_argument('--skip_missing_images', action='store_true',
                        help='FashionIQ, CIRR and Shoes: drop triplets and gallery entries whose '
                             'image is missing (counted and recorded) instead of stopping '
                             '(default: %(default)s)')


def dataset_options(opt):
    """Constructor arguments beyond (path, split, transform), from the flags (main.py's defaults
    where `opt` lacks one, as retrieve.py's options do)."""
    def flag(name, default):
        return getattr(opt, name, default)
    if opt.dataset == 'css3d':
        return {'query_images': flag('css_query_images', '3d')}
    options = {'fast_decode': flag('fast_decode', False)}
    if opt.dataset == 'fashion200k':
        order = flag('f200k_label_order', None)
        options['label_order'] = order.split(',') if order else None
    elif opt.dataset == 'fashioniq':
        category = flag('fiq_category', 'all')
        options.update(categories=['dress', 'shirt', 'toptee'] if category == 'all' else [category],
                       protocol=flag('fiq_protocol', 'split'),
                       skip_missing_images=flag('skip_missing_images', False))
    elif opt.dataset == 'cirr':
        options['skip_missing_images'] = flag('skip_missing_images', False)
    elif opt.dataset == 'shoes':
        options.update(protocol=flag('shoes_protocol', 'val'),
                       skip_missing_images=flag('skip_missing_images', False))
    return options


def check_css_query_images(opt):
    """2D->3D (SPEC 2.1) draws the queries and needs the rendered PNGs for the rest."""
    if getattr(opt, 'css_query_images', '3d') != '2d':
        return
    if opt.dataset != 'css3d':
        raise UserError(f'--css_query_images=2d: only for --dataset=css3d (the dataset here is '
                        f'{opt.dataset})')
    images = os.path.join(opt.dataset_path, 'images')
    if not os.path.isdir(images):
        raise UserError(f'--css_query_images=2d: {images}: no such folder; 2D->3D needs the '
                        f'rendered PNGs (make_css_dataset.py --pngs writes them) as targets and '
                        f'gallery')


def adopt_checkpoint_query_images(opt, ckpt):
    """--css_query_images from a checkpoint trained on this dataset unless given: a 2D->3D
    model is tested 2D->3D."""
    saved = ckpt.get('opt')
    given = 'css_query_images' in getattr(opt, 'explicit_flags', ())
    if given or getattr(saved, 'dataset', None) != opt.dataset:
        return
    opt.css_query_images = getattr(saved, 'css_query_images', '3d')
    if opt.css_query_images == '2d':
        print('Query images: 2D drawings (the checkpoint\'s --css_query_images=2d)')


def load_dataset(opt, test_split='test'):
    """(train split, `test_split`) of --dataset at --dataset_path."""
    if not os.path.isdir(opt.dataset_path):
        raise UserError(f'--dataset_path={opt.dataset_path}: no such folder')
    check_css_query_images(opt)
    print('Reading dataset', opt.dataset)
    module_name, class_name = DATASET_CLASSES[opt.dataset]
    cls = getattr(importlib.import_module(module_name), class_name)
    transform = datasets.css_transform() if opt.dataset == 'css3d' else datasets.photo_transform()
    options = dataset_options(opt)
    trainset = cls(opt.dataset_path, 'train', transform, **options)
    testset = cls(opt.dataset_path, test_split, transform, **options)
    for dataset in (trainset, testset):
        print('  ' + dataset.summary())
    return trainset, testset


def load_data(opt):
    if distributed.is_main_process():
        ensure_default_dataset(opt)
    distributed.barrier()
    with contextlib.redirect_stdout(sys.stdout if distributed.is_main_process() else None):
        trainset, testset = load_dataset(opt, 'test1' if opt.test_split == 'test1' else 'test')
    # --skip_missing_images: what was dropped travels with the run's options (tensorboard text,
    # checkpoints), so no number is reported without its caveat.
    skipped = {d.split: d.skipped for d in (trainset, testset) if getattr(d, 'skipped', None)}
    if skipped:
        opt.skipped_missing_images = skipped
    return trainset, testset


def create_model(opt, texts, vocab=None):
    weights = {'imagenet': True, 'none': False}.get(opt.img_weights, opt.img_weights)
    print('Creating model', opt.model)
    try:
        model = model_registry.MODELS[opt.model](
            texts, opt.embed_dim, pretrained=weights, vocab=vocab,
            backbone=getattr(opt, 'img_backbone', None) or 'resnet18')
    except img_text_composition_models.WeightsUnavailableError as e:
        raise UserError(str(e)) from None
    return model


def build_model(opt, init_ckpt, init_path, trainset, device):
    vocab = None
    if init_ckpt is not None:  # its --model, --embed_dim and --img_backbone already adopted
        opt.checkpoint_it = int(init_ckpt.get('it', 0))
        opt.img_weights = 'none'  # every weight comes from the checkpoint
    with contextlib.redirect_stdout(sys.stdout if distributed.is_main_process() else None):
        vocab = build_vocabulary(opt, init_ckpt, init_path, trainset)
        model = create_model(opt, trainset.get_all_texts(), vocab)
    if init_ckpt is not None:
        load_model_weights(model, init_ckpt, init_path)
    model = model.to(device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_img_weights(opt):
    if opt.img_weights in ('imagenet', 'none'):
        return
    title = img_text_composition_models.BACKBONES[opt.img_backbone].title
    if not os.path.isfile(opt.img_weights):
        what = ('a folder, not a file' if os.path.isdir(opt.img_weights) else
                'not a regular file' if os.path.exists(opt.img_weights) else 'no such file')
        raise UserError(f"--img_weights={opt.img_weights}: {what} (expected 'imagenet', "
                        f"'none' or a path to a {title} state dict)")
    try:
        img_text_composition_models.load_resnet(opt.img_backbone, opt.img_weights)
    except img_text_composition_models.WeightsUnavailableError as e:
        raise UserError(str(e)) from None  # the message already names --img_weights=PATH


def check_model_fits_dataset(opt):
    """Once --model and --dataset are known (a checkpoint's own): before the data is read and
    before any run folder."""
    try:
        paper_composers.check_dataset(opt.model, opt.dataset)
    except ValueError as e:
        raise UserError(str(e)) from None


def adopt_checkpoint_dataset(opt, ckpt, path):
    """--dataset, --dataset_path and, on the checkpoint's own dataset, that dataset's flags
    (--fiq_category, --fiq_protocol, ...) from the checkpoint's options unless given.  A dataset
    folder that is not here is an error, never another dataset in its place."""
    saved = ckpt.get('opt')
    if not hasattr(saved, 'dataset'):
        return
    if 'dataset' not in opt.explicit_flags:
        if 'dataset_path' not in opt.explicit_flags:
            saved_path = getattr(saved, 'dataset_path', None)
            if not saved_path or not os.path.isdir(saved_path):
                raise UserError(f'{path}: its dataset folder {saved_path!r} is not here; give '
                                f'--dataset_path=DIR (and --dataset)')
            opt.dataset_path = os.path.abspath(saved_path)
        opt.dataset = saved.dataset
    if opt.dataset != saved.dataset:
        return
    for name in ('fiq_category', 'fiq_protocol', 'f200k_label_order', 'shoes_protocol'):
        if name not in opt.explicit_flags and hasattr(saved, name):
            setattr(opt, name, getattr(saved, name))


ARCHITECTURE_FLAGS = ('model', 'embed_dim', 'img_backbone')


def check_architecture_flags(opt, ckpt, path):
    """A --model, --embed_dim or --img_backbone given that contradicts what the checkpoint
    records: refused naming both.  Different models can have identical state-dict layouts
    (imgonly's and show_and_tell's), so the weights would load and be scored as another model's.
    A checkpoint that records none (the released ones name no backbone) may be told."""
    saved = ckpt.get('opt')
    for name in ARCHITECTURE_FLAGS:
        given, recorded = getattr(opt, name, None), getattr(saved, name, None)
        if name in opt.explicit_flags and recorded is not None and given != recorded:
            raise UserError(f'--{name}={given}: {path} records --{name}={recorded}; leave '
                            f'--{name} out to use the checkpoint\'s')


def adopt_checkpoint_architecture(opt, ckpt):
    """Take --model, --embed_dim and --img_backbone from the checkpoint's options unless given on
    the command line.  Checkpoints without --img_backbone (the released ones) are ResNet-18."""
    saved = ckpt.get('opt')
    if 'img_backbone' not in opt.explicit_flags:
        opt.img_backbone = getattr(saved, 'img_backbone', 'resnet18')
    for name in ('model', 'embed_dim'):
        if name not in opt.explicit_flags and hasattr(saved, name):
            setattr(opt, name, getattr(saved, name))


def build_vocabulary(opt, ckpt, path, trainset):
    """The checkpoint's own vocabulary, else one built from the training texts.  Released
    checkpoints carry none and were trained with first-seen numbering (SPEC 7); a wrong order
    loads silently and scores near chance, so the run says which order it used."""
    if ckpt is not None and 'vocab' in ckpt:
        if 'vocab_order' in getattr(opt, 'explicit_flags', ()):
            print(f'Note: {path} carries its vocabulary; --vocab_order is ignored')
        return text_model.SimpleVocab(ckpt['vocab'])
    texts = trainset.get_all_texts()
    given = getattr(opt, 'vocab_order', None)
    if ckpt is None:
        return text_model.SimpleVocab.from_texts(texts, given or 'sorted')
    order = given or 'first_seen'
    vocab = text_model.SimpleVocab.from_texts(texts, order)
    rows = ckpt['model_state_dict'].get('text_model.embedding_layer.weight')
    if rows is not None and rows.shape[0] != vocab.get_size():
        raise UserError(
            f'{path}: its word embedding has {rows.shape[0]} words, but the vocabulary built from '
            f'the {len(texts)} {opt.dataset} training texts in {opt.dataset_path} has '
            f'{vocab.get_size()}; the checkpoint carries no vocabulary, so evaluate it with the '
            f'exact training data it was trained on')
    other = 'sorted' if order == 'first_seen' else 'first_seen'
    print(f'{path} carries no vocabulary: numbered the {vocab.get_size()} words of the training '
          f'texts in {order} order; if recall looks like chance, try --vocab_order={other}')
    return vocab


def model_name(model):
    return {cls: name for name, cls in model_registry.MODELS.items()}[type(model)]


def check_backbone_of_weights(model, ckpt, path):
    """A checkpoint whose image encoder is another backbone than the model's, named both ways."""
    weights = img_text_composition_models.backbone_of_state_dict(ckpt['model_state_dict'], 'img_model.')
    if weights is None or weights == model.backbone:
        return
    titles = {name: b.title for name, b in img_text_composition_models.BACKBONES.items()}
    saved = getattr(ckpt.get('opt'), 'img_backbone', None)
    why = (' as its options say' if saved == model.backbone else
           ' (given here)' if saved is not None or model.backbone != 'resnet18' else
           ' (its options name no backbone: ResNet-18, the reference\'s)')
    raise UserError(f'{path}: its image encoder weights are {titles[weights]} '
                    f'(--img_backbone={weights}), but the model is built with '
                    f'--img_backbone={model.backbone}{why}')


def load_model_weights(model, ckpt, path):
    check_backbone_of_weights(model, ckpt, path)
    mismatch = checkpoints.describe_state_dict_mismatch(model, ckpt['model_state_dict'])
    if mismatch:
        saved = ckpt.get('opt')
        hint = (f' (it was trained with --model={saved.model} --embed_dim={saved.embed_dim})'
                if hasattr(saved, 'model') and hasattr(saved, 'embed_dim') else '')
        raise UserError(f'{path}: does not fit --model={model_name(model)}: {mismatch}{hint}')
    out_of_range = model.state_dict_out_of_range(ckpt['model_state_dict'])
    if out_of_range:
        raise UserError(f'{path}: {out_of_range}')
    model.load_state_dict(ckpt['model_state_dict'], strict=True)
