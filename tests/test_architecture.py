"""The layout a reader finds their way by (issue 24, docs/architecture.md): no import cycle among
the project's modules, main.py short enough to read as the training script, and no module or
function too long to read, each checked on the source with `ast` (nothing is imported)."""
import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_MAX_LINES = 550
BENCH_MAX_LINES = 150  # the command line only; the sections live in benchmarks/
MODULE_MAX_LINES = 800
FUNCTION_MAX_LINES = 80
LONG_MODULES = {'datasets.py'}  # the reference's three datasets, in the file the card names
LONG_FUNCTIONS = {('main.py', 'get_args_parser')}  # one add_argument after another


def project_files():
    """{module name: path}: every top-level .py and, when present, the benchmarks/ package."""
    files = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(REPO, '*.py'))}
    for path in glob.glob(os.path.join(REPO, 'benchmarks', '**', '*.py'), recursive=True):
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        files['.'.join(parts)] = path
    return files


def imported_names(tree, module):
    """Dotted names of everything `module` imports, anywhere in it (an import inside a function
    closes a cycle as surely as one at the top); relative imports resolved."""
    package = module.split('.') if module == 'benchmarks' else module.split('.')[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f'{base}.{alias.name}' for alias in node.names)


def import_graph(files):
    """{module: set of project modules it imports}."""
    graph = {}
    for module, path in files.items():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        graph[module] = set()
        for name in imported_names(tree, module):
            while name and name not in files:  # 'benchmarks.data.load' -> 'benchmarks.data'
                name = name.rpartition('.')[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}  # module -> 'open' while on the path, 'done' after

    def visit(module, path):
        state[module] = 'open'
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 'open':
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 'done'
        return None
    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def line_count(path):
    with open(path, encoding='utf-8') as f:
        return len(f.read().splitlines())


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'d', 'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'z': {'y'}, 'y': {'x'}, 'x': set(), 'w': {'x', 'y'}}) is None


def test_the_import_graph_sees_top_level_function_level_and_from_imports():
    graph = import_graph(project_files())
    assert {'checkpoints', 'run_folder', 'sampling', 'experiment'} <= graph['main']
    assert 'event_log' in graph['run_folder']  # imported inside open_run
    assert graph['model_registry'] == {'img_text_composition_models', 'paper_composers'}
    assert 'paper_composers' not in graph['img_text_composition_models']


def test_no_import_cycle_among_the_project_modules():
    cycle = find_cycle(import_graph(project_files()))
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_main_py_is_short_enough_to_read_as_the_training_script():
    assert line_count(os.path.join(REPO, 'main.py')) <= MAIN_MAX_LINES


def test_bench_py_is_only_the_command_line():
    assert line_count(os.path.join(REPO, 'bench.py')) <= BENCH_MAX_LINES


def test_no_module_is_too_long_to_read():
    long = {os.path.relpath(path, REPO): line_count(path) for path in project_files().values()}
    long = {name: n for name, n in long.items() if n > MODULE_MAX_LINES and name not in LONG_MODULES}
    assert not long, f'over {MODULE_MAX_LINES} lines: {long}'


def test_no_function_is_too_long_to_read():
    long = []
    for path in project_files().values():
        name = os.path.relpath(path, REPO)
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > FUNCTION_MAX_LINES and (name, node.name) not in LONG_FUNCTIONS:
                    long.append(f'{name}:{node.lineno} {node.name} ({lines} lines)')
    assert not long, f'over {FUNCTION_MAX_LINES} lines: {long}'
