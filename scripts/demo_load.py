"""Demo step: load a release the two ways users do: plain Hugging Face `datasets`, then torch."""

from __future__ import annotations

import os
import sys

import datasets
import numpy as np
import torch

from lymphatlas_ds import load_lymphatlas

parent = sys.argv[1]  # the folder that holds the release folder "lymphatlas"
os.chdir(parent)

# 1. Plain datasets, literally as a user would type it next to the release folder.
ds = datasets.load_dataset("./lymphatlas", "nhl", split="train")  # a path: a bare name is a Hub repo id
row = ds[0]
ct = np.asarray(row["ct"].dataobj)
print(f"datasets: {len(ds)} NHL train cases; first {row['case_id']}: CT {ct.shape} {ct.dtype}, "
      f"fold {row['fold']}, lesions {row['lesion_count']}")

# 2. torch: fold 0 of the cross-validation, random 64^3 patches, 2 DataLoader workers.
train = load_lymphatlas("./lymphatlas", config="all", split="train", fold=0, subset="train",
                          patch_size=(64, 64, 64), samples_per_case=2)
loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2)
batch = next(iter(loader))
print(f"torch: {len(train)} patches per epoch in fold 0/train; batch image {tuple(batch['image'].shape)} "
      f"{batch['image'].dtype}, label {tuple(batch['label'].shape)}, foreground voxels {int(batch['label'].sum())}")
