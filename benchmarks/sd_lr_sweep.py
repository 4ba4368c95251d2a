"""The learning-rate probe behind the world SD's default lr (docs/sd.md): a method (default FTTP) on one
concept, 20 steps from 5 images, full UNet fine-tuning, batch 2, at each lr; UA over 20 seeds and the
share of 20 generated images of three other concepts that the world classifier still recognises.

    OMP_NUM_THREADS=1 python benchmarks/sd_lr_sweep.py vorn fttp 1e-5 3e-5 5e-5 1e-4
"""

import sys
import time

import numpy as np

from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.models.sd import load_sd_adapter
from unlearn.world.build import build_world
from unlearn.world.classifier import load_classifier
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_sd_data
from unlearn.world.render import CONCEPT_INDEX
from unlearn.world.sd import concept_prompt
from unlearn.world.source import resolve_model

OTHERS = ("quilla", "blip", "korvex")


def ua(adapter, clf, key, n=20):
    images = adapter.generate([concept_prompt(BY_KEY[key])] * n, list(range(n)))
    return 100 * float(np.mean(clf.predict(images) != CONCEPT_INDEX[key]))


def main(key: str, method: str, lrs: list[float]) -> None:
    clf = load_classifier(build_world(only=("classifier",))["classifier"])
    c = BY_KEY[key]
    for lr in lrs:
        a = load_sd_adapter(resolve_model("world", "sd"))
        forget, retain = world_sd_data(key, 5, a.resolution)
        before = ua(a, clf, key)
        t = time.time()
        run_loop(a, get_method(method, modality="sd"), forget, retain, TrainConfig(steps=20, lr=lr, lora=False, batch_size=2),
                 c.key, c.names, progress=False)
        kept = [100 - ua(a, clf, o) for o in OTHERS if o != key]
        print(f"{key} {method} lr {lr:g}: UA {before:.0f} -> {ua(a, clf, key):.0f}; other concepts recognised "
              f"{dict(zip([o for o in OTHERS if o != key], kept))} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3:]])
