"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``."""

from vaelab.evaluate import main

if __name__ == "__main__":
    main()
