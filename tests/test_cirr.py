"""CIRR (SPEC 2.5) on tiny trees in the exact layouts, against a per-query implementation."""
import json
import os

import pytest

from fiq_cirr_fixtures import (NameModel, cirr_layout, per_query_ranking, use_id_images, write_cirr,
                               write_json)

import cirr
import datasets


def load(root, split='test', **options):
    return cirr.CIRR(str(root), split, datasets.photo_transform(), **options)


def stand_in(dataset, query_scores=None):
    return NameModel(use_id_images(dataset), [img['captions'][0] for img in dataset.imgs], query_scores)


def per_query_rankings(model, entry, gallery):
    """(ranking, subset ranking) of one entry: a full sort of the gallery less the reference,
    then that ranking kept to the img_set members."""
    ranking = per_query_ranking(model, entry['reference'], entry['caption'],
                                [n for n in gallery if n != entry['reference']])
    members = set(entry['img_set']['members'])
    return ranking, [n for n in ranking if n in members]


def per_query_recalls(model, entries, gallery):
    hits = {f'recall_top{k}': 0 for k in (1, 5, 10, 50)}
    hits.update({f'recall_subset_top{k}': 0 for k in (1, 2, 3)})
    for entry in entries:
        ranking, subset = per_query_rankings(model, entry, gallery)
        for k in (1, 5, 10, 50):
            hits[f'recall_top{k}'] += entry['target_hard'] in ranking[:k]
        for k in (1, 2, 3):
            hits[f'recall_subset_top{k}'] += entry['target_hard'] in subset[:k]
    metrics = {name: count / len(entries) for name, count in hits.items()}
    metrics['recall_avg'] = (metrics['recall_top5'] + metrics['recall_subset_top1']) / 2
    return metrics


@pytest.fixture(scope='module')
def cirr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('cirr')
    write_cirr(str(root), cirr_layout())
    return root


# --------------------------------------------------------------------------------------------
# Recalls and the evaluation server's files

def test_recalls_equal_the_per_query_implementation(cirr_root):
    layout = cirr_layout()['val']
    dataset = load(cirr_root)
    model = stand_in(dataset)
    metrics = cirr.evaluate(model, dataset, batch_size=4)
    expected = per_query_recalls(model, layout['entries'], layout['images'])
    assert [name for name, _ in metrics] == list(expected)
    assert dict(metrics) == pytest.approx(expected)
    assert 0 < dict(metrics)['recall_top10'] < 1 and 0 < dict(metrics)['recall_subset_top1'] < 1


def test_recalls_hold_when_queries_come_in_several_chunks(cirr_root, monkeypatch):
    import test_retrieval
    monkeypatch.setattr(test_retrieval, 'MAX_SCORES_PER_CHUNK', 56 * 3)  # 3 queries a chunk
    layout = cirr_layout()['val']
    dataset = load(cirr_root)
    model = stand_in(dataset)
    expected = per_query_recalls(model, layout['entries'], layout['images'])
    assert dict(cirr.evaluate(model, dataset, batch_size=5)) == pytest.approx(expected)


def designed_scores(layout, order):
    """The first val entry ranks `order(reference, target, members, others)` first."""
    entry = layout['val']['entries'][0]
    members = [m for m in entry['img_set']['members'] if m not in (entry['reference'], entry['target_hard'])]
    others = [n for n in layout['val']['images'] if n not in entry['img_set']['members']]
    names = order(entry['reference'], entry['target_hard'], members, others)
    return {(entry['reference'], entry['caption']): {n: 1.0 - 0.01 * i for i, n in enumerate(names)}}


def first_query_metrics(root, layout, order):
    dataset = load(root)
    dataset.test_queries = dataset.test_queries[:1]
    return dict(cirr.evaluate(stand_in(dataset, designed_scores(layout, order)), dataset, batch_size=4))


def test_the_reference_is_removed_from_its_own_ranking(cirr_root):
    metrics = first_query_metrics(cirr_root, cirr_layout(),
                                  lambda reference, target, members, others: [reference, target])
    assert metrics['recall_top1'] == 1.0 and metrics['recall_subset_top1'] == 1.0


@pytest.mark.parametrize('order, expected', [
    # Four non-members, then two members, then the target: 7th overall, 3rd in its subset.
    (lambda reference, target, members, others: others[:4] + members[:2] + [target],
     {'recall_top5': 0.0, 'recall_top10': 1.0, 'recall_subset_top1': 0.0, 'recall_subset_top2': 0.0,
      'recall_subset_top3': 1.0, 'recall_avg': 0.0}),
    # Five non-members, then the target, then members: 6th overall, 1st in its subset.
    (lambda reference, target, members, others: others[:5] + [target] + members,
     {'recall_top5': 0.0, 'recall_top10': 1.0, 'recall_subset_top1': 1.0, 'recall_subset_top2': 1.0,
      'recall_subset_top3': 1.0, 'recall_avg': 0.5}),
])
def test_subset_recall_ranks_only_the_other_img_set_members(cirr_root, order, expected):
    metrics = first_query_metrics(cirr_root, cirr_layout(), order)
    assert {name: metrics[name] for name in expected} == expected


def test_test1_files_list_every_pairid_with_its_50_and_3_best_names_in_order(cirr_root, tmp_path):
    layout = cirr_layout()['test1']
    dataset = load(cirr_root, 'test1')
    model = stand_in(dataset)
    recall, recall_subset = cirr.test1_submission(model, dataset, batch_size=4)
    paths = cirr.write_test1_files(str(tmp_path), recall, recall_subset)
    assert paths == [os.path.join(str(tmp_path), 'cirr_test1_recall.json'),
                     os.path.join(str(tmp_path), 'cirr_test1_recall_subset.json')]
    with open(paths[0]) as f:
        written_recall = json.load(f)
    with open(paths[1]) as f:
        written_subset = json.load(f)
    expected_recall = {'version': 'rc2', 'metric': 'recall'}
    expected_subset = {'version': 'rc2', 'metric': 'recall_subset'}
    for entry in layout['entries']:
        ranking, subset = per_query_rankings(model, entry, layout['images'])
        expected_recall[str(entry['pairid'])] = ranking[:50]
        expected_subset[str(entry['pairid'])] = subset[:3]
    assert written_recall == recall == expected_recall
    assert written_subset == recall_subset == expected_subset
    assert all(len(names) == 50 for key, names in recall.items() if key not in ('version', 'metric'))
    assert [len(recall_subset[str(e['pairid'])]) for e in layout['entries']] == [3, 3, 3, 3, 2, 3]


def small_test1_layout():
    """A test1 split of 20 images (a gallery of 50 or fewer): entry 0's reference is image 0;
    entry 1 has image 0 in its img_set and the stand-in ranks it first (see small_test1_scores)."""
    names = [f'test1-{i}-img0' for i in range(20)]
    members = [[0, 1, 2, 3, 4, 5], [5, 0, 2, 9, 11, 13], [7, 8, 19, 3, 12, 6]]
    references = [0, 5, 7]
    entries = [{'pairid': 300 + i, 'reference': names[references[i]], 'caption': f'test1 caption {i}',
                'img_set': {'id': i, 'members': [names[m] for m in members[i]]}}
               for i in range(3)]
    return {'test1': {'images': names, 'entries': entries}}


def small_test1_scores(layout):
    names, entries = layout['test1']['images'], layout['test1']['entries']
    # Entry 1: its own reference scored highest (it must not be listed), then image 0.
    return {(entries[1]['reference'], entries[1]['caption']): {
        entries[1]['reference']: 2.0, names[0]: 1.0, names[2]: 0.9, names[19]: 0.8}}


def test_test1_with_a_small_gallery_never_lists_the_reference_and_keeps_image_0(tmp_path):
    layout = write_cirr(str(tmp_path), small_test1_layout())
    names, entries = layout['test1']['images'], layout['test1']['entries']
    dataset = load(tmp_path, 'test1')
    model = stand_in(dataset, small_test1_scores(layout))
    recall, recall_subset = cirr.test1_submission(model, dataset, batch_size=2)
    for entry in entries:
        ranking, subset = per_query_rankings(model, entry, names)
        pairid = str(entry['pairid'])
        assert recall[pairid] == ranking and len(ranking) == 19  # every other image, in order
        assert entry['reference'] not in recall[pairid]
        assert recall_subset[pairid] == subset[:3]
    # Image 0 (id 0) is listed where it ranks: first for entry 1, in both files.
    assert recall['301'][:2] == recall_subset['301'][:2] == [names[0], names[2]]
    assert names[0] not in recall['300'] and names[0] not in recall_subset['300']


def test_test1_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk (here a file size limit) while the files are written: the previous files stay
    as they were and no temporary file is left, instead of a truncated file the server would take."""
    import resource
    import signal
    first = {'version': 'rc2', 'metric': 'recall', '1': ['a', 'b']}
    paths = cirr.write_test1_files(str(tmp_path), first, dict(first, metric='recall_subset'))
    before = [open(p).read() for p in paths]
    big = dict(first, **{str(i): [f'name-{i}-{j}' for j in range(50)] for i in range(200)})
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
        with pytest.raises(OSError) as error:
            cirr.write_test1_files(str(tmp_path), big, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert paths[0] in str(error.value) and '\n' not in str(error.value)
    assert [open(p).read() for p in paths] == before
    assert sorted(os.listdir(str(tmp_path))) == sorted(os.path.basename(p) for p in paths)


def test_test1_with_skipped_missing_images_is_refused(tmp_path, monkeypatch, capsys):
    """The server expects every pairid: a submission that dropped queries is never written."""
    import main
    layout = small_test1_layout()
    write_cirr(str(tmp_path / 'cirr'), layout, missing=[layout['test1']['images'][7]])
    dataset = load(tmp_path / 'cirr', 'test1', skip_missing_images=True)
    assert dataset.skipped['dropped_queries'] == 1
    with pytest.raises(datasets.DatasetError, match='expects every pairid'):
        cirr.test1_submission(stand_in(dataset), dataset, batch_size=2)
    monkeypatch.chdir(tmp_path)
    assert main.main(['--dataset=cirr', f'--dataset_path={tmp_path / "cirr"}', '--test_only',
                      '--test_split=test1', '--skip_missing_images', '--img_weights=none']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('main.py: error: --skip_missing_images with '
                                                    'CIRR test1: the evaluation server expects every pairid')
    assert not os.path.exists(tmp_path / 'runs')


def test_test1_has_no_recall(cirr_root):
    dataset = load(cirr_root, 'test1')
    assert all(q['target_caption'] is None for q in dataset.get_test_queries())
    with pytest.raises(datasets.DatasetError, match='test1 has no targets'):
        cirr.evaluate(stand_in(dataset), dataset, batch_size=4)


# --------------------------------------------------------------------------------------------
# Layouts, images, training examples, vocabulary

@pytest.mark.parametrize('official', [True, False])
def test_annotations_under_root_or_root_cirr_and_image_paths_relative_to_root(tmp_path, official):
    layout = write_cirr(str(tmp_path), cirr_layout(), official=official)
    dataset = load(tmp_path)
    assert [img['captions'][0] for img in dataset.imgs] == layout['val']['images']
    assert dataset.image_file(3) == os.path.join(str(tmp_path), 'dev', 'dev-3-img0.png')
    assert dataset.get_img(3).shape == (3, 224, 224)
    entries = layout['val']['entries']
    queries = dataset.get_test_queries()
    assert [(q['pairid'], q['mod']['str'], q['source_caption'], q['target_caption']) for q in queries] == \
        [(e['pairid'], e['caption'], e['reference'], e['target_hard']) for e in entries]
    names = layout['val']['images']
    assert [[names[i] for i in q['subset_ids']] for q in queries] == \
        [[m for m in e['img_set']['members'] if m != e['reference']] for e in entries]


def test_training_examples_are_reference_caption_target(cirr_root):
    entries = cirr_layout()['train']['entries']
    dataset = load(cirr_root, 'train')
    assert dataset.num_training_examples() == len(entries)
    assert dataset.get_test_queries() == []
    for i in range(2 * len(entries)):
        entry, example = entries[i % len(entries)], dataset[i]
        assert dataset.imgs[example['source_img_id']]['captions'] == [entry['reference']]
        assert dataset.imgs[example['target_img_id']]['captions'] == [entry['target_hard']]
        assert example['mod'] == {'str': entry['caption']}
        assert example['target_img_data'].shape == (3, 224, 224)


def test_the_train_split_is_scored_on_at_most_its_entries(cirr_root):
    import test_retrieval
    examples = test_retrieval.sample_training_examples(load(cirr_root, 'train'))
    assert len(examples) == len(cirr_layout()['train']['entries'])


def test_vocabulary_texts_are_the_train_captions_for_every_split(cirr_root):
    expected = [e['caption'] for e in cirr_layout()['train']['entries']]
    for split in ('train', 'test', 'test1'):
        assert load(cirr_root, split).get_all_texts() == expected


def test_missing_images_are_one_line_or_dropped_with_counts(tmp_path, capsys):
    layout = cirr_layout()
    entry = layout['val']['entries'][2]
    used = {n for e in layout['val']['entries'] for n in (e['reference'], e['target_hard'])}
    unused = [n for n in layout['val']['images'] if n not in used][0]
    write_cirr(str(tmp_path), layout, missing=[entry['reference'], unused])
    with pytest.raises(datasets.DatasetError) as error:
        load(tmp_path)
    assert '\n' not in str(error.value) and '2 of the 56 images' in str(error.value)
    assert entry['reference'] in str(error.value)
    dataset = load(tmp_path, skip_missing_images=True)
    dropped = [e for e in layout['val']['entries'] if entry['reference'] in (e['reference'], e['target_hard'])]
    assert dataset.skipped == {'missing_images': 2, 'dropped_queries': len(dropped), 'dropped_gallery': 2}
    assert 'CIRR test: missing images 2' in capsys.readouterr().out
    kept = [e for e in layout['val']['entries'] if e not in dropped]
    gallery = [n for n in layout['val']['images'] if n not in (entry['reference'], unused)]
    model = stand_in(dataset)
    assert dict(cirr.evaluate(model, dataset, batch_size=4)) == \
        pytest.approx(per_query_recalls(model, kept, gallery))


def test_only_regular_files_are_images_a_fifo_is_never_opened(tmp_path):
    layout = cirr_layout()
    fifo, folder = layout['val']['images'][3], layout['val']['images'][4]
    write_cirr(str(tmp_path), layout, missing=[fifo, folder])
    os.mkfifo(os.path.join(str(tmp_path), 'dev', fifo + '.png'))
    os.mkdir(os.path.join(str(tmp_path), 'dev', folder + '.png'))
    with pytest.raises(datasets.DatasetError) as error:
        load(tmp_path)
    message = str(error.value)
    assert '2 of the 56 images' in message and fifo in message and folder in message


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the entry

def cap_file(root, split='val'):
    return os.path.join(str(root), 'cirr', 'captions', f'cap.rc2.{split}.json')


def split_file(root, split='val'):
    return os.path.join(str(root), 'cirr', 'image_splits', f'split.rc2.{split}.json')


def rewrite_entries(change):
    def rewrite(root, layout):
        entries = layout['val']['entries']
        change(entries)
        write_json(cap_file(root), entries)
    return rewrite


def truncated_json(root, layout):
    with open(cap_file(root), 'w') as f:
        f.write('[{"pairid": 1,\n "reference": }]')


def deeply_nested_json(path):
    def change(root, layout):
        with open(path(root), 'w') as f:  # valid JSON, too deep for the parser's recursion
            f.write('{"a": ' * 100000 + '1' + '}' * 100000)
    return change


@pytest.mark.parametrize('change, expected', [
    (truncated_json, [cap_file('{root}'), 'malformed JSON', 'line 2 column 15']),
    (deeply_nested_json(cap_file), [cap_file('{root}') + ': JSON nested too deeply']),
    (deeply_nested_json(split_file), [split_file('{root}') + ': JSON nested too deeply']),
    (lambda root, layout: os.remove(cap_file(root)),
     [cap_file('{root}'), 'CIRR captions file not found, nor',
      os.path.join('{root}', 'captions', 'cap.rc2.val.json')]),
    (lambda root, layout: os.remove(split_file(root)), [split_file('{root}'), 'CIRR image split file not found']),
    (rewrite_entries(lambda entries: entries[5].pop('target_hard')),
     [cap_file('{root}') + ' entry 5', 'missing field "target_hard"']),
    (rewrite_entries(lambda entries: entries[5].pop('caption')),
     [cap_file('{root}') + ' entry 5', 'missing field "caption"']),
    (rewrite_entries(lambda entries: entries[5]['img_set'].pop('members')),
     [cap_file('{root}') + ' entry 5 img_set', 'missing field "members"']),
    (rewrite_entries(lambda entries: entries[4].update(pairid='7')),
     [cap_file('{root}') + ' entry 4 field "pairid"', 'expected an integer, got a string']),
    (rewrite_entries(lambda entries: entries[4].update(pairid=entries[1]['pairid'])),
     [cap_file('{root}') + ' entry 4', 'repeats entry 1']),
    (rewrite_entries(lambda entries: entries[6].update(reference='dev-999-img0')),
     [cap_file('{root}') + ' entry 6', 'reference "dev-999-img0" is not in', split_file('{root}')]),
    (rewrite_entries(lambda entries: entries[6].update(target_hard='dev-999-img0')),
     [cap_file('{root}') + ' entry 6', 'target_hard "dev-999-img0" is not in', split_file('{root}')]),
    (rewrite_entries(lambda entries: entries[6]['img_set']['members'].append('dev-999-img0')),
     [cap_file('{root}') + ' entry 6', 'img_set member "dev-999-img0" is not in']),
])
def test_bad_annotations_are_one_line_naming_the_file_and_entry(tmp_path, change, expected):
    layout = write_cirr(str(tmp_path), cirr_layout())
    change(str(tmp_path), layout)
    with pytest.raises(datasets.DatasetError) as error:
        load(tmp_path)
    message = str(error.value)
    assert '\n' not in message
    for part in expected:
        assert part.replace('{root}', str(tmp_path)) in message


def test_evaluation_leaves_the_model_in_training_mode(cirr_root):
    dataset = load(cirr_root)
    model = stand_in(dataset)
    model.train()
    cirr.evaluate(model, dataset, batch_size=4)
    assert model.training


def test_main_reports_bad_annotations_as_one_line_without_traceback(tmp_path):
    from conftest import TINY, run_main
    root = str(tmp_path / 'cirr')
    layout = write_cirr(root, cirr_layout())
    rewrite_entries(lambda entries: entries[6].update(reference='dev-999-img0'))(root, layout)
    result = run_main(TINY[1:] + ['--dataset=cirr', f'--dataset_path={root}'], cwd=str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == (f'main.py: error: {cap_file(root)} entry 6: reference "dev-999-img0" is not '
                        f'in {split_file(root)}')
    assert 'Traceback' not in result.stdout
