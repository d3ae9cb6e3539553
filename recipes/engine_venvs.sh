#!/usr/bin/env bash
# Build (once) and print the path of a separate venv for an engine check.
# usage: recipes/engine_venvs.sh torchtitan|megatron
# The venvs live outside the repo (NANOLLM_VENVS, default ~/.cache/nanollm/venvs) and are
# pinned to torch 2.13.0 CPU so no engine pulls another torch build.
set -euo pipefail
engine="${1:-}"
root="${NANOLLM_VENVS:-$HOME/.cache/nanollm/venvs}"
py="${PYTHON:-python3}"
case "$engine" in
  torchtitan) pkgs=(torch==2.13.0 torchtitan==0.2.2 triton safetensors numpy tomli_w) ;;
  megatron)   pkgs=(torch==2.13.0 megatron-core==0.16.1 numpy) ;;
  *) echo "error: unknown engine '$engine'; use torchtitan or megatron" >&2; exit 2 ;;
esac
venv="$root/$engine"
stamp="$venv/.nanollm-ok"
want="${pkgs[*]}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then echo "$venv"; exit 0; fi
mkdir -p "$root"
rm -rf "$venv.tmp"
"$py" -m venv "$venv.tmp" >&2
# torch==2.13.0 resolves to the +cpu wheel this machine carries (pip find-links); the
# version check below catches any other build.
"$venv.tmp/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}" >&2
ver="$("$venv.tmp/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$ver" != 2.13.0* ]]; then
  echo "error: $engine venv got torch $ver, not 2.13.0; check the pins in $0" >&2; exit 1
fi
echo "$want" > "$venv.tmp/.nanollm-ok"
rm -rf "$venv"
mv "$venv.tmp" "$venv"
echo "$venv"
