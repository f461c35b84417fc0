"""Train an mmadapt model.

    deepspeed train.py --config configs/xcomposer.yaml [key.sub=value ...]
    python train.py --config configs/xcomposer.yaml model=models/tiny.yaml train.max_steps=8
"""

import sys

from mmadapt.run import main

if __name__ == "__main__":
    sys.exit(main())
