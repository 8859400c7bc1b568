"""Build src/finegrain/_demo/birds10 (the demo's data, shipped in the package) from ../shared/data/cub100:
10 species in look-alike pairs, 8 train + 4 test images each, resized to 160 px. Run once; the output is
committed with its attribution.

    python scripts/make_demo_data.py
"""

import os
import shutil
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "..", "shared", "data", "cub100")
DST = os.path.join(ROOT, "src", "finegrain", "_demo", "birds10")
SPECIES = [
    "020.American_Goldfinch",
    "021.European_Goldfinch",
    "053.Baltimore_Oriole",
    "054.Hooded_Oriole",
    "063.Black_throated_Sparrow",
    "067.White_crowned_Sparrow",
    "092.Red_bellied_Woodpecker",
    "094.Red_headed_Woodpecker",
    "096.Cactus_Wren",
    "097.Carolina_Wren",
]
PER_SPLIT = {"train": 8, "test": 4}

if not os.path.isdir(SRC):
    sys.exit(f"needs {SRC}")
for split, n in PER_SPLIT.items():
    for sp in SPECIES:
        out = os.path.join(DST, split, sp.split(".", 1)[1])
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for name in sorted(os.listdir(os.path.join(SRC, split, sp)))[:n]:
            img = Image.open(os.path.join(SRC, split, sp, name)).convert("RGB")
            img.resize((160, 160), Image.Resampling.LANCZOS).save(os.path.join(out, name), quality=90)
print("wrote", DST)
