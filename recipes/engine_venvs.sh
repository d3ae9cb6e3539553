#!/usr/bin/env bash
# Build (once) and print the path of a separate venv for an engine check.
# usage: recipes/engine_venvs.sh torchtitan|megatron
# The venvs live outside the repo (NANOLLM_VENVS, default ~/.cache/nanollm/venvs), are built from the
# fully pinned recipes/engine-<engine>.txt (torch 2.13.0 CPU, so no engine pulls another torch build),
# and are rebuilt when that file changes (a stamp holds the file's content). A failed install exits nonzero.
set -euo pipefail
engine="${1:-}"
root="${NANOLLM_VENVS:-$HOME/.cache/nanollm/venvs}"
py="${PYTHON:-python3}"
case "$engine" in
  torchtitan|megatron) ;;
  *) echo "error: unknown engine '$engine'; use torchtitan or megatron" >&2; exit 2 ;;
esac
pins="$(cd "$(dirname "$0")" && pwd)/engine-$engine.txt"
venv="$root/$engine"
stamp="$venv/.nanollm-ok"
want="$(cat "$pins")"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then echo "$venv"; exit 0; fi
mkdir -p "$root"
rm -rf "$venv.tmp"
"$py" -m venv "$venv.tmp" >&2
# torch==2.13.0 resolves to the +cpu wheel this machine carries (pip find-links); the
# version check below catches any other build.
"$venv.tmp/bin/pip" install -q --disable-pip-version-check -r "$pins" >&2
ver="$("$venv.tmp/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$ver" != 2.13.0* ]]; then
  echo "error: $engine venv got torch $ver, not 2.13.0; check the pins in $pins" >&2; exit 1
fi
echo "$want" > "$venv.tmp/.nanollm-ok"
rm -rf "$venv"
mv "$venv.tmp" "$venv"
echo "$venv"
