#!/usr/bin/env python3
"""Write WORK/patients.csv: the studies of WORK/train and WORK/more in one manifest.

The patient network decides from a whole study, and the 288 training patients of the
shipped model's training set were few for it: scripts/train-shipped-model.sh and
scripts/compare-architectures.sh train it on both sets, the second one's test split
joined to training (its patients are never used for testing).

    .venv/bin/python scripts/patients-manifest.py WORK
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.dataset import read_manifest, write_manifest  # noqa: E402

work = Path(sys.argv[1]).resolve()
rows = [{"study": e.path.relative_to(work), "label": e.class_name,
         "annotations": e.annotations.relative_to(work), "masks": e.masks.relative_to(work),
         "split": "train" if (folder, e.split) == ("more", "test") else e.split}
        for folder in ("train", "more") for e in read_manifest(work / folder)]
write_manifest(work / "patients.csv", rows)
print(f"wrote {work / 'patients.csv'}: {len(rows)} studies")
