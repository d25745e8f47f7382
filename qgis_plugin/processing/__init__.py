"""DiffusionSat's Processing provider: one algorithm per task, plus the engine status.

Registered from the plugin's ``initProcessing()``, so the toolbox, the graphical modeler,
batch mode and ``qgis_process run diffusionsat:generate -- ...`` all work, with or without the GUI.
"""
