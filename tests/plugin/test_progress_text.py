"""The task description the plugin shows for an engine job record (a pure function)."""

from __future__ import annotations

from qgis_plugin.tasks import progress_text


def test_decoding_a_large_extent_is_named_not_shown_as_a_step():
    # generate --gsd reports its decode after the steps as one more part of the job (step = decoded
    # tiles, tile = the steps done): "step 9/225 · tile 3/3" read as a third step of two
    job = {"state": "running", "step": 9, "total_steps": 225, "tile": 2, "total_tiles": 3, "message": "decoding",
           "eta_s": 40.0}
    assert progress_text(job) == "decoding 9/225 · about 40 s left"
    job.update(message="denoising", step=3, total_steps=20, tile=0, total_tiles=4)
    assert progress_text(job) == "step 3/20 · tile 1/4 · about 40 s left"


def test_a_job_record_that_says_windows_is_read_as_windows_without_a_plan():
    """An extend or generate --gsd job the plugin did not plan (or whose plan said nothing) reports
    step = windows done, tile = steps done; the engine's record says ``windows``."""
    from qgis_plugin.tasks import denoises_windows

    job = {"state": "running", "step": 13, "total_steps": 225, "tile": 0, "total_tiles": 3, "message": "denoising",
           "windows": True, "eta_s": None}
    assert denoises_windows(job) and denoises_windows(job, {"joint_denoising": False})
    assert not denoises_windows(dict(job, windows=False)) and denoises_windows(dict(job, windows=False),
                                                                              {"joint_denoising": True})
    assert "window 13/225" in progress_text(job, denoises_windows(job))
