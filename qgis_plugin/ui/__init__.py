"""The dock widget, the engine settings dialog and the extent map tool (widgets built in code)."""
