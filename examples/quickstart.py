"""The main job in under three minutes on 2 CPU cores: FP32, direct and DQA at 3 and 4 bits on real data.

Pretrained ResNet-32 on CIFAR-10 (both from ``../shared``, nothing to download), post-training quantization
through ``Trainer(callbacks=[DQACallback(...)]).validate(...)``: accuracy on the first 2,000 test images and
the whole network's peak activation memory of one image (KiB in FP32 and with the activations stored as
codes, and the saving between them), calibrated on 1,000 seeded-random training images.

    python examples/quickstart.py            # add --limit-test 10000 for the full test set
"""

from __future__ import annotations

import sys

from reproduce_paper import main

DEFAULTS = ["--bits", "3", "4", "--methods", "fp32", "direct", "dqa", "--limit-test", "2000", "--calib-samples", "1000"]

if __name__ == "__main__":
    main(DEFAULTS + sys.argv[1:])
