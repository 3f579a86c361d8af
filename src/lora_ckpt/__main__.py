"""``python -m lora_ckpt``: the command line, as ``lora-ckpt``."""

from lora_ckpt.cli import run

if __name__ == "__main__":
    run()
