"""The sizes that ``generate --help``'s examples state are the sizes those commands produce."""

from __future__ import annotations

import json
import re
import shlex

from engine.cli import EPILOG_GENERATE, main


def stated_examples(epilog: str) -> list[tuple[int, int, list[str]]]:
    """(width, height, argv) of each example whose comment states ``W x H px``."""
    found = []
    for comment, command in re.findall(r"^  # ([^\n]*)\n  (diffusionsat generate .*?)(?:\n\n|\n\S|\Z)", epilog,
                                       flags=re.M | re.S):
        size = re.search(r"(\d+) x (\d+) px", comment)
        if size:
            argv = shlex.split(command.replace("\\\n", " "))[1:]
            found.append((int(size.group(1)), int(size.group(2)), argv))
    return found


def test_generate_examples_state_the_size_they_make(tmp_path, capsys):
    examples = stated_examples(EPILOG_GENERATE)
    assert examples, "generate --help's examples state no size"
    for width, height, argv in examples:
        out = argv.index("--out") + 1
        argv[out] = str(tmp_path / argv[out])
        assert main([*argv, "--model", "tiny", "--dry-run", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["width"], plan["height"]) == (width, height), " ".join(argv)


def test_every_example_keeps_its_line_breaks():
    """An example's continuation is ``\\`` at the end of the printed line: a single backslash in
    the Python source joins the two lines instead (``--gsd 2       --date`` on one 130-column
    line), which a reader copying the command cannot tell from a typo."""
    from engine import cli

    epilogs = {name: text for name, text in vars(cli).items() if name.startswith("EPILOG_")}
    assert "EPILOG_GENERATE" in epilogs
    for name, text in epilogs.items():
        for line in text.splitlines():
            body = line.split("  # ")[0].strip()  # an aligned trailing comment is fine
            if body.startswith("diffusionsat ") or line.startswith("      --"):
                assert "   " not in body, f"{name}: a line continuation was lost: {line!r}"
