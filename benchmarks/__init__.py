"""bench.py's sections, one module each (retrieval, loss, train, backbones, data, memory, ddp,
models), and what they share (common, peak_memory, fixtures, command_line).

A section is a module with measure(args, device, tmp) -> (lines, result): the lines bench.py
prints and the section's entry in its --json file.  To add one, write the module and add it to
bench.py's SECTIONS (the order there is the order of the run); its flags go in bench.py's parser.
The modules assume the repository's root on sys.path, as bench.py puts it there.
"""
