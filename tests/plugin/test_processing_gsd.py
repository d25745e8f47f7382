"""diffusionsat:generate at a ground resolution (GSD, or {"gsd": ...} in OPTIONS), as the dock's
Size → Ground resolution: found by the analyst's trial with a 60 km EXTENT through qgis_process,
which could only make one 512 px image at 117 m/px (OPTIONS {"gsd": 20} was refused: SIZE was
always sent as well)."""

from __future__ import annotations

import pytest
from qgis.core import QgsProcessingException, QgsProcessingFeedback, QgsRasterLayer

from .test_processing import provider  # noqa: F401 - the fixture

EXTENT = "300000,302000,4636000,4638000 [EPSG:32633]"  # 2 km


@pytest.mark.parametrize("how", ["GSD", "OPTIONS"])
def test_generate_at_a_ground_resolution(provider, engine_env, tmp_path, how):  # noqa: F811
    import processing

    out = tmp_path / "g.tif"
    params = {"EXTENT": EXTENT, "DATE": "2021-06-15", "STEPS": 1, "MODEL": "tiny", "SEED": 2, "OUTPUT": str(out)}
    params.update({"GSD": 16.0} if how == "GSD" else {"OPTIONS": '{"gsd": 16}'})
    result = processing.run("diffusionsat:generate", params)
    layer = QgsRasterLayer(result["OUTPUT"], "g")
    assert layer.isValid()
    assert (layer.width(), layer.height()) == (128, 128)  # 2000 m / 16 m/px = 125, rounded up to 8s
    assert layer.rasterUnitsPerPixelX() == pytest.approx(16.0, rel=1e-3)


def test_gsd_with_width_is_refused_before_anything_runs(provider, engine_env, tmp_path):  # noqa: F811
    import processing

    class Errors(QgsProcessingFeedback):
        seen: list = []

        def reportError(self, error, fatalError=False):  # noqa: N802
            self.seen.append(error)

    feedback = Errors()
    with pytest.raises(QgsProcessingException):
        processing.run("diffusionsat:generate", {"EXTENT": EXTENT, "GSD": 16.0, "WIDTH": 64, "MODEL": "tiny",
                                                 "OUTPUT": str(tmp_path / "w.tif")}, feedback=feedback)
    assert any("leave WIDTH and HEIGHT empty" in e for e in feedback.seen), feedback.seen
    assert not (tmp_path / "w.tif").exists()
