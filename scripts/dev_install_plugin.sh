#!/usr/bin/env bash
# Install the plugin from this checkout into a QGIS profile, as symlinks (edits show up after a
# plugin reload, e.g. with the Plugin Reloader plugin).
#
#   bash scripts/dev_install_plugin.sh [profile]        # default profile: "default"
#   bash scripts/dev_install_plugin.sh --copy [profile] # copies instead of symlinks
#
# Target: $QGIS_PROFILES_DIR/<profile>/python/plugins/diffusionsat, where QGIS_PROFILES_DIR
# defaults to ~/.local/share/QGIS/QGIS3/profiles (Linux). Then enable "DiffusionSat" in
# Plugins → Manage and Install Plugins. In a checkout the plugin finds the engine's interpreter
# at <repo>/.venv/bin/python by itself (bash scripts/setup.sh creates it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
mode=link
if [ "${1:-}" = "--copy" ]; then mode=copy; shift; fi
profile=${1:-default}
profiles=${QGIS_PROFILES_DIR:-$HOME/.local/share/QGIS/QGIS3/profiles}
dest="$profiles/$profile/python/plugins/diffusionsat"

if [ -L "$dest" ] || [ -e "$dest" ]; then rm -rf "$dest"; fi
mkdir -p "$dest"
place() {  # place SOURCE NAME
    if [ "$mode" = link ]; then ln -s "$1" "$dest/$2"; else cp -R "$1" "$dest/$2"; fi
}
for entry in "$ROOT"/qgis_plugin/*; do
    name=$(basename "$entry")
    [ "$name" = "__pycache__" ] && continue
    place "$entry" "$name"
done
place "$ROOT/metadata.txt" metadata.txt
place "$ROOT/LICENSE" LICENSE
place "$ROOT/resources/icons" icons
if [ "$mode" = copy ]; then find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +; fi
echo "installed ($mode) into $dest"
