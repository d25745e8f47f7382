"""Messages and docs point at things that exist: commands users can run, files in a clone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_in_a_clone(doc):
    text = doc.read_text()
    assert "../shared" not in text and "shared/reference" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        assert (doc.parent / target).exists(), f"{doc.name} links {target}, which is not in the repository"


def test_design_page_describes_this_repository():
    text = (ROOT / "docs" / "design.md").read_text()
    assert "[docs/design.md](docs/design.md)" in (ROOT / "README.md").read_text()
    # the layout it draws is the one on disk
    for path in re.findall(r"^\s{0,2}([\w/]+(?:\.py|\.txt|\.toml|/))\s", text, flags=re.M):
        candidates = [ROOT / path, ROOT / "engine" / path, ROOT / "qgis_plugin" / path]
        assert any(c.exists() for c in candidates), f"docs/design.md names {path}, which does not exist"


def test_training_install_line_is_this_repository_s_extra():
    text = (ROOT / "docs" / "training.md").read_text()
    assert "pip install -e '.[train]'" in text and "diffusionsat-qgis[train]" not in text
    assert 'train = [' in (ROOT / "pyproject.toml").read_text()


def test_no_models_installed_points_at_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "diffusionsat download" in out and "unzip" not in out

    from engine.models.loading import load_model

    notice = " ".join(load_model("auto").notices)
    assert "diffusionsat download" in notice


def _temporal_examples() -> list[str]:
    from engine.cli import EPILOG_TEMPORAL

    texts = [doc.read_text() for doc in DOCS] + [EPILOG_TEMPORAL]
    joined = "\n".join(texts).replace("\\\n", " ")
    return re.findall(r"diffusionsat temporal (?:--input \S+ ?)+[^\n]*", joined)


def test_temporal_examples_name_inputs_whose_dates_can_be_found():
    """A temporal example without --input-date runs only if each input's name holds a date
    (``--input 2019.tif`` was refused: a year is not a date)."""
    from engine.geo.raster_metadata import date_from_name

    examples = _temporal_examples()
    assert examples
    for example in examples:
        if "--input-date" in example:
            continue
        for name in re.findall(r"--input (\S+)", example):
            assert date_from_name(Path(name).name) is not None, f"{name!r} in {example!r} has no date in its name"


def test_a_ten_band_stack_without_names_is_shown_a_ten_band_example(tmp_path, capsys):
    """The fix offered for a 10-band stack of unnamed bands was a 4-band --bands example."""
    from .test_tiled_tasks import s2_dn, write

    src = write(tmp_path / "stack.tif", s2_dn((10, 16, 16)))
    assert main(["superres", "--input", src, "--model", "tiny", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--bands B02,B03,B04,B05,B06,B07,B08,B8A,B11,B12" in err and len(err.strip().splitlines()) == 1
    # and the example, as given, is accepted
    assert main(["superres", "--input", src, "--bands", "B02,B03,B04,B05,B06,B07,B08,B8A,B11,B12",
                 "--model", "tiny", "--dry-run"]) == 0
