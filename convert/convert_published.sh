#!/usr/bin/env bash
# Convert the eight published OpenELM models into MLX model directories.
#
#   convert/convert_published.sh TOKENIZER [OUT_DIR] [extra convert flags, e.g. --dtype float32]
#
# TOKENIZER: the Llama-2 SentencePiece tokenizer.model (a path) or a hub id such as
# meta-llama/Llama-2-7b-hf (gated: accept its license and run `hf auth login` first).
# Needs network access. Models already converted in OUT_DIR are skipped.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 TOKENIZER [OUT_DIR] [convert flags]" >&2
    exit 2
fi
tokenizer="$1"
out_dir="${2:-models}"
shift $(( $# >= 2 ? 2 : 1 ))
python="${PYTHON:-python}"

for size in 270M 450M 1_1B 3B; do
    for variant in "" "-Instruct"; do
        name="OpenELM-${size}${variant}"
        target="${out_dir}/$(echo "${name}" | tr '[:upper:]' '[:lower:]')"
        if [[ -f "${target}/config.json" ]]; then
            echo "skip ${name}: ${target} exists" >&2
            continue
        fi
        echo "converting apple/${name} -> ${target}" >&2
        "${python}" -m elm_mlx.convert --hf-path "apple/${name}" --mlx-path "${target}" \
            --tokenizer "${tokenizer}" "$@"
    done
done
