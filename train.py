"""Train a model: ``python train.py model=ssvae data.labeled=100`` (see src/vaelab/conf/train.yaml)."""

from vaelab.train import main

if __name__ == "__main__":
    main()
