"""The README stays short, its set-up commands stay at the top, and no relative link in the
README or docs/ leads nowhere (a moved section leaves anchors behind that GitHub shows as dead)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
MAX_README_LINES = 350
SETUP_WITHIN_LINES = 60

LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^\s*(```|~~~)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')


def prose_lines(text):
    """The lines outside fenced code blocks, with inline code spans blanked: a `# comment` in a
    shell block is no heading, and `[x](y)` inside backticks is no link."""
    inside_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside_fence = not inside_fence
            continue
        if not inside_fence:
            yield re.sub(r'`[^`]*`', '``', line)


def github_slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped except '-' and '_',
    spaces turned into '-'."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors_of(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    anchors, seen = set(), {}
    for heading in heading_texts(text):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f'{slug}-{count}')
        seen[slug] = count + 1
    return anchors


def heading_texts(text):
    inside_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside_fence = not inside_fence
            continue
        match = HEADING.match(line)
        if match and not inside_fence:
            yield match.group(2)


def markdown_files():
    docs = os.path.join(ROOT, 'docs')
    return [README] + sorted(os.path.join(docs, name) for name in os.listdir(docs)
                             if name.endswith('.md'))


def relative_links(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    for line in prose_lines(text):
        for target in LINK.findall(line):
            if not re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
                yield target


def test_github_slug_matches_githubs_anchors():
    assert github_slug("The paper's tables") == 'the-papers-tables'
    assert github_slug('Image backbone: ResNet-18 or ResNet-50') == 'image-backbone-resnet-18-or-resnet-50'
    assert github_slug('Does it learn? (synthetic CSS, CPU)') == 'does-it-learn-synthetic-css-cpu'
    assert github_slug('Runs, checkpoints and resuming') == 'runs-checkpoints-and-resuming'
    assert github_slug('`--model` and the_flags') == '--model-and-the_flags'


def test_anchors_skip_code_blocks_and_number_repeated_headings(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# Top\n\n```bash\n# not a heading\n```\n\n## Notes\n\n### Notes\n')
    assert anchors_of(str(page)) == {'top', 'notes', 'notes-1'}


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition('#')
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(f'{target}: no file {os.path.relpath(linked, ROOT)}')
        elif anchor and linked.endswith('.md') and anchor not in anchors_of(linked):
            broken.append(f'{target}: no heading with anchor #{anchor} in {os.path.relpath(linked, ROOT)}')
    assert not broken, f'{os.path.relpath(path, ROOT)}: ' + '; '.join(broken)


def test_readme_is_short():
    with open(README, encoding='utf-8') as f:
        assert len(f.read().splitlines()) <= MAX_README_LINES


def bash_blocks(lines):
    """(first line number, text) of each ```bash block."""
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == '```bash':
            start = number
        elif start is not None and line.strip() == '```':
            blocks.append((start, '\n'.join(lines[start:number - 1])))
            start = None
    return blocks


INSTALL = 'pip install -r requirements.txt'


def setup_commands():
    """(first line number, text) of the README's bash blocks that install the project."""
    with open(README, encoding='utf-8') as f:
        return [block for block in bash_blocks(f.read().splitlines()) if INSTALL in block[1]]


def test_both_setup_commands_are_near_the_top():
    commands = setup_commands()
    assert len(commands) == 2, f'{len(commands)} set-up commands (bash blocks with {INSTALL!r}), expected 2'
    (train_line, train), (tests_line, tests) = commands
    assert train_line <= SETUP_WITHIN_LINES and tests_line <= SETUP_WITHIN_LINES
    assert 'python main.py' in train
    assert 'python -m pytest' in tests


def test_ci_runs_the_readmes_test_command():
    tests = setup_commands()[1][1]
    readme_pytest = tests[tests.index('-m pytest'):].strip()
    with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
        ci_pytest = [line[line.index('-m pytest'):].strip() for line in f if '-m pytest' in line]
    assert ci_pytest == [readme_pytest]
