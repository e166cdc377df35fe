"""Pictures of retrieval results: per row, a query image with its text, then its top-k results with
rank, score and caption; a result whose caption is the query's target caption is framed in green.

retrieve.py writes one row as a PNG; log_retrieval_examples logs a few rows to tensorboard
('retrieval examples') at each of main.py's retrieval tests.
"""
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import test_retrieval

TILE = 128  # each image is fitted into a TILE x TILE square
PAD = 8
FRAME = 4  # width of the green frame around a correct result
GAP = 16  # between the query and its results
TEXT_LINES = 4  # lines of text under each tile
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
CORRECT_COLOR = (0, 160, 0)
QUERY_COLOR = (40, 40, 160)
TILE_BORDER = (200, 200, 200)
MAX_COLUMNS = 10  # results per line of a row; more continue on the next line


def as_pil(img):
    """A PIL image (any mode) or an HxWx3 float array in [0, 1] (CSS drawn in 2D) as RGB PIL."""
    if isinstance(img, PIL.Image.Image):
        return img.convert('RGB')
    array = np.asarray(img, dtype=np.float32)
    return PIL.Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), 'RGB')


def display_image(dataset, idx):
    """Image `idx` of a dataset as it looks on disk (no transform), as RGB PIL."""
    return as_pil(dataset.get_img(int(idx), raw_img=True))


def display_query_image(dataset, idx):
    """Image `idx` as a query's source (CSS 2D->3D: the 2D drawing), as RGB PIL."""
    import test_retrieval
    return as_pil(test_retrieval.query_image(dataset, int(idx), raw_img=True))


def _font():
    try:
        return PIL.ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return PIL.ImageFont.load_default()


def _fit(img, size):
    """Scaled to fit a size x size square (nearest-neighbour when enlarging, so small CSS images
    stay sharp), centred on the background."""
    img = as_pil(img)
    scale = size / max(img.size)
    new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = PIL.Image.NEAREST if scale >= 1 else PIL.Image.LANCZOS
    img = img.resize(new_size, resample)
    tile = PIL.Image.new('RGB', (size, size), BACKGROUND)
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def _wrap(draw, font, text, width, max_lines):
    """Greedy word wrap to `width` pixels (a word too long for a line is cut into pieces), at most
    max_lines lines, the last one ending in '...' when text was left out."""
    def fits(line):
        return draw.textlength(line, font=font) <= width

    lines, line = [], ''
    for word in str(text).split():
        while not fits(word):  # cut an over-long word
            cut = max(1, max(n for n in range(1, len(word) + 1) if n == 1 or fits(word[:n])))
            if line:
                lines.append(line)
                line = ''
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f'{line} {word}' if line else word
        if fits(candidate):
            line = candidate
        else:
            lines.append(line)
            line = word
    if line or not lines:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and not fits(last + '...'):
            last = last[:-1]
        lines[-1] = last + '...'
    return lines


def draw_rows(rows, tile=TILE, max_columns=MAX_COLUMNS):
    """One picture of retrieval results.

    rows: a list of dicts, one per query: `query_img` (PIL image or float array), `query_text`,
    optional `query_note` (a line under the text, e.g. the target caption), and `results`, a list
    of dicts with `img`, `rank`, `score`, `caption` and `correct` (frame it in green).  Results
    past `max_columns` continue on further lines, so the width stays bounded.
    Returns an RGB PIL image.
    """
    font = _font()
    line_height = int(sum(font.getbbox('Ag')[1::2])) + 3
    layout = {'tile': tile, 'cell': tile + PAD, 'font': font, 'line_height': line_height,
              'row_height': PAD + tile + PAD // 2 + TEXT_LINES * line_height + PAD,
              'max_columns': max_columns,
              'probe': PIL.ImageDraw.Draw(PIL.Image.new('RGB', (1, 1)))}
    columns = min(max_columns, max((len(row['results']) for row in rows), default=0))
    width = PAD + layout['cell'] + GAP + columns * layout['cell']
    lines = [max(1, -(-len(row['results']) // max_columns)) for row in rows]
    picture = PIL.Image.new('RGB', (width, sum(lines) * layout['row_height'] + PAD // 2),
                            BACKGROUND)
    draw = PIL.ImageDraw.Draw(picture)
    y = PAD
    for row, row_lines in zip(rows, lines):
        _draw_row(picture, draw, layout, row, y, row_lines)
        y += row_lines * layout['row_height']
    return picture


def _put_text(draw, layout, x, y, lines, color=TEXT_COLOR):
    for i, line in enumerate(lines[:TEXT_LINES]):
        draw.text((x, y + i * layout['line_height']), line, fill=color, font=layout['font'])


def _draw_row(picture, draw, layout, row, y, row_lines):
    """The query at (PAD, y), then its results, `max_columns` to a line."""
    tile, cell, font, probe = layout['tile'], layout['cell'], layout['font'], layout['probe']
    picture.paste(_fit(row['query_img'], tile), (PAD, y))
    draw.rectangle([PAD - 1, y - 1, PAD + tile, y + tile], outline=QUERY_COLOR, width=1)
    lines = _wrap(probe, font, 'query: ' + str(row['query_text']), tile,
                  TEXT_LINES - (1 if row.get('query_note') else 0))
    if row.get('query_note'):
        lines += _wrap(probe, font, row['query_note'], tile, 1)
    _put_text(draw, layout, PAD, y + tile + PAD // 2, lines, QUERY_COLOR)
    x0 = PAD + cell + GAP
    separator_x = x0 - GAP // 2 - PAD // 2
    draw.line([separator_x, y, separator_x, y + (row_lines - 1) * layout['row_height'] + tile],
              fill=(160, 160, 160), width=2)
    for c, result in enumerate(row['results']):
        x = x0 + (c % layout['max_columns']) * cell
        top = y + (c // layout['max_columns']) * layout['row_height']
        picture.paste(_fit(result['img'], tile), (x, top))
        draw.rectangle([x - 1, top - 1, x + tile, top + tile], outline=TILE_BORDER, width=1)
        header = f'#{result["rank"]}  {result["score"]:.3f}'
        color = TEXT_COLOR
        if result.get('correct'):
            draw.rectangle([x - FRAME, top - FRAME, x + tile + FRAME - 1, top + tile + FRAME - 1],
                           outline=CORRECT_COLOR, width=FRAME)
            header += '  target'
            color = CORRECT_COLOR
        lines = [header] + _wrap(probe, font, result['caption'], tile, TEXT_LINES - 1)
        _put_text(draw, layout, x, top + tile + PAD // 2, lines, color)


def to_chw(picture):
    """An RGB PIL picture as a 3xHxW uint8 array (what tensorboard's add_image takes)."""
    return np.ascontiguousarray(np.asarray(picture.convert('RGB'), dtype=np.uint8).transpose(2, 0, 1))


def result_row(dataset, query_img, query_text, scores, indices, target_caption=None,
               query_note=None):
    """A row of draw_rows for gallery indices (best first) of `dataset` and their scores."""
    results = []
    for rank, (score, idx) in enumerate(zip(scores, indices), 1):
        caption = dataset.imgs[int(idx)]['captions'][0]
        results.append({'img': display_image(dataset, idx), 'rank': rank, 'score': float(score),
                        'caption': caption,
                        'correct': target_caption is not None and caption == target_caption})
    return {'query_img': query_img, 'query_text': query_text, 'query_note': query_note,
            'results': results}


def log_retrieval_examples(logger, dataset, features, it, count=4, k=5):
    """Tensorboard image 'retrieval examples': `count` fixed, evenly spaced test queries, one row
    each (source image and text), then their top-k results, the correct ones framed in green.
    It reuses the retrieval test's features and draws from no random generator."""
    queries = dataset.get_test_queries()
    ids = sorted({i * len(queries) // count for i in range(count)})
    exclude = None if features['exclude'] is None else features['exclude'][ids]
    scores, neighbours = test_retrieval.top_k_with_scores(features['query'][ids],
                                                          features['gallery'], k, exclude)
    rows = [result_row(
        dataset, display_query_image(dataset, queries[i]['source_img_id']),
        queries[i]['mod']['str'], scores[r].tolist(), neighbours[r].tolist(),
        queries[i]['target_caption'], f'target: {queries[i]["target_caption"]}')
        for r, i in enumerate(ids)]
    picture = np.asarray(draw_rows(rows).convert('RGB'))
    logger.add_image('retrieval examples', picture, it, dataformats='HWC')
