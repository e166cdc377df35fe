"""Tiny Shoes trees in the release formats and each of the three image layouts (SPEC 2.6), built
like the real lists: triplets with both images in the eval list, a self-pair, triplets touching
an image in neither list, triplets across the train and eval lists."""
import json
import os

from fiq_cirr_fixtures import write_image

# The folder an image of category `cat`, numbered n, lies in, per layout (n % 2 picks 0 or 1).
LAYOUTS = {
    'flat': os.path.join('womens_{cat}', '{half}'),
    'attributedata': os.path.join('attributedata', 'womens_{cat}', '{half}'),
    'images': os.path.join('images', 'womens', 'womens_{cat}', '{half}'),
}
CATEGORIES = ('clogs', 'pumps', 'boots')


def image_name(n):
    return f'img_womens_{CATEGORIES[n % len(CATEGORIES)]}_{n}.jpg'


def image_folder(layout, name):
    _, _, cat, number = name[:-len('.jpg')].split('_')
    return LAYOUTS[layout].format(cat=cat, half=int(number) % 2)


def small_lists():
    """(train names, eval names, triplets as (reference, target, caption)) of the counting
    fixture: a1..a4 train, b1..b5 eval (b5 in no triplet), n1, n2 in neither list."""
    a1, a2, a3, a4 = (image_name(n) for n in (1, 2, 3, 4))
    b1, b2, b3, b4, b5 = (image_name(n) for n in (11, 12, 13, 14, 15))
    n1, n2 = image_name(21), image_name(22)
    triplets = [
        (a1, a2, 'is darker'),            # 0 both train
        (a2, a3, 'has a higher heel'),    # 1 both train
        (a3, a1, 'is more pointy'),       # 2 both train
        (b1, b2, 'is red'),               # 3 both eval
        (b3, b3, 'is the same shoe'),     # 4 eval self-pair
        (b2, n1, 'is shinier'),           # 5 eval -> neither
        (n2, b4, 'has laces'),            # 6 neither -> eval
        (a4, b1, 'is a sandal'),          # 7 train -> eval
        (n1, n2, 'is brown'),             # 8 neither, neither
        (b4, b1, 'has a strap'),          # 9 both eval
        (a1, a3, 'is taller'),            # 10 both train
    ]
    return [a1, a2, a3, a4], [b1, b2, b3, b4, b5], triplets


def write_shoes(root, train_names, eval_names, triplets, layout='flat', extra_images=(), missing=()):
    """The release files and a JPEG for every name in a list or a triplet (and `extra_images`)
    except `missing`: {name: path} of the images written."""
    os.makedirs(root, exist_ok=True)
    entries = [{'ImageName': target, 'ReferenceImageName': reference, 'RelativeCaption': caption}
               for reference, target, caption in triplets]
    with open(os.path.join(root, 'relative_captions_shoes.json'), 'w') as f:
        json.dump(entries, f)
    for file_name, names in (('train_im_names.txt', train_names), ('eval_im_names.txt', eval_names)):
        with open(os.path.join(root, file_name), 'w') as f:
            f.write(''.join(name + '\n' for name in names))
    names = list(dict.fromkeys(list(train_names) + list(eval_names) + list(extra_images) +
                               [n for reference, target, _ in triplets for n in (reference, target)]))
    paths = {}
    for i, name in enumerate(names):
        if name in missing:
            continue
        paths[name] = os.path.join(root, image_folder(layout, name), name)
        write_image(paths[name], seed=i)
    return paths


def larger_lists():
    """(train names, eval names, triplets) for training: 8 train and 14 eval names, so recall@10
    is not trivial, with a self-pair and triplets touching images in neither list.  Under val, 20
    test queries (8 eval-eval triplets twice, the self-pair, 3 touching another image) and a
    gallery of 17 (the 14 plus 2 outside and 1 train image); under unique, 9 and the 14."""
    train = [image_name(n) for n in range(1, 9)]
    evaluation = [image_name(n) for n in range(31, 45)]
    outside = [image_name(n) for n in (61, 62)]
    triplets = [(train[i], train[(i * 3 + 1) % 8], f'train caption {i} darker') for i in range(8)]
    triplets += [(evaluation[i], evaluation[(i * 5 + 1) % 14], f'eval caption {i} taller')
                 for i in range(8)]
    triplets += [(evaluation[5], evaluation[5], 'the same'),
                 (evaluation[2], outside[0], 'shinier'), (outside[1], evaluation[9], 'with laces'),
                 (train[3], evaluation[4], 'a sandal')]
    return train, evaluation, triplets
