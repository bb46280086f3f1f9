"""`python -m elm_mlx.convert`: the converter's front door (the same as `elm-mlx convert`).

    python -m elm_mlx.convert --hf-path apple/OpenELM-270M-Instruct \\
        --mlx-path ./openelm-270m-instruct --tokenizer /path/to/llama2/tokenizer.model

The conversion itself lives in `elm_mlx.formats.convert`.
"""

if __name__ == "__main__":
    import sys

    from elm_mlx import cli

    sys.exit(cli.main(["convert", *sys.argv[1:]]))
