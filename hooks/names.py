"""Names the command line offers as choices, in a module that imports nothing heavy.

``uniprobe --help`` builds every subcommand's parser; importing torch for a tuple of strings made it
take seconds. :mod:`uniprobe.hooks.layout` and :mod:`uniprobe.hooks.dtypes` hold the same names
(``tests/test_cli_startup.py`` checks they agree).
"""

from __future__ import annotations

# roles of positions in a TokenLayout; a role's id is its index here
ROLES: tuple[str, ...] = ("text", "image_und", "query", "cot", "image_gen", "pad")
# dtypes a store may be captured in (keys of uniprobe.hooks.dtypes.DTYPES)
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
