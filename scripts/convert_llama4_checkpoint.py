"""Convert a transformers Llama 4 checkpoint folder to llama4x (or back; the direction follows its model_type).

python scripts/convert_llama4_checkpoint.py --input Llama-4-folder --output llama4x-folder
python scripts/convert_llama4_checkpoint.py --input llama4x-folder --output llama4-folder --dtype bfloat16
"""

import argparse
import sys

from llama4x.cli import add_convert_arguments, main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(parser)
    return parser


if __name__ == "__main__":
    make_parser().parse_args()  # --help and usage errors here, with this script's name
    sys.exit(main(["convert", *sys.argv[1:]]))
