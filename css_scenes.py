"""What a CSS scene is, without torch: the colours and shapes of its objects, the name of the
data file, and the reference's 2D drawing of a scene.  numpy only, so that make_css_dataset.py
starts in a fraction of a second; datasets.py reads the data through them."""
import numpy as np


CSS_COLORS = {
    'gray': [87, 87, 87],
    'red': [244, 35, 35],
    'blue': [42, 75, 215],
    'green': [29, 205, 20],
    'brown': [129, 74, 25],
    'purple': [129, 38, 192],
    'cyan': [41, 208, 208],
    'yellow': [255, 238, 51],
}
CSS_DATA_FILE = 'css_toy_dataset_novel2_small.dup.npy'


def draw_css_2d_image(objects, size=64):
    """The reference's 2D rendering of a CSS scene: HxWx3 floats in [0, 1] on white."""
    img = np.ones((size, size, 3))
    for obj in objects:
        s = 8.0 if obj['size'] == 'large' else 4.0
        c = [v / 255.0 for v in CSS_COLORS[obj['color']]]
        y = obj['pos'][0] * size
        x = obj['pos'][1] * size
        # Rows and columns past the canvas are left out (an object at a border is cut, as in
        # the middle of the canvas nothing changes), never wrapped around by negative indices.
        if obj['shape'] == 'rectangle':
            img[max(0, int(y - s)):int(y + s), max(0, int(x - s)):int(x + s), :] = c
        elif obj['shape'] == 'circle':  # drawn as a diamond, as in the reference
            for y0 in range(max(0, int(y - s)), min(size - 1, int(y + s)) + 1):
                x0 = x + (abs(y0 - y) - s)
                x1 = 2 * x - x0
                img[y0, max(0, int(x0)):int(x1), :] = c
        elif obj['shape'] == 'triangle':  # apex at the top, base 2s wide at the bottom
            for y0 in range(max(0, int(y - s)), min(size, int(y + s))):
                half_width = (y0 - y + s) / 2
                img[y0, max(0, int(x - half_width)):int(x + half_width), :] = c
    return img


CSS_SHAPES = ('rectangle', 'circle', 'triangle')
