"""Reference: plain PyTorch fine-tuning of the same network on the same labelled rows as
a `byol finetune` run (run with the project's venv).

  finetune_torch.py --ft FT --train DIR [--steps 100] [--workers 2] [--json]

What a user's PyTorch script does today: the pretrained run's encoder (FT/config.toml's
[finetune] source, `online.safetensors` of its checkpoint) in the model of
`byol_torch.py` plus a Linear head of one output per class; a Dataset over the rows of
FT/label_keys.txt (PIL decode) with torchvision.transforms.v2 RandomResizedCrop (the
recipe's scale and ratio) + horizontal flip + normalise in DataLoader worker processes;
cross-entropy, SGD with the recipe's (Nesterov) momentum, cosine learning rate;
channels-last and bf16 autocast when FT's resolved config says so, as byol does.
Trains `--steps` steps and prints images/s measured after the first 5 steps.
"""

import argparse
import io
import json
import math
import os
import sys
import time
import tomllib

import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byol_torch import ResNet  # noqa: E402
from torchvision_two_views import Shards  # noqa: E402


class Subset(Dataset):
    def __init__(self, shards, keys_file, size, f, mean, std):
        wanted = set(open(keys_file).read().split("\n")) - {""}
        self.s = shards
        # keys of every row, in the shards' order
        keys = []
        for path in shards.files:
            keys += pq.read_table(path, columns=["key"]).column("key").to_pylist()
        self.rows = [i for i, k in enumerate(keys) if k in wanted]
        self.t = v2.Compose([
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(f.get("crop_scale", [0.08, 1.0])),
                                 ratio=tuple(f.get("crop_ratio", [3 / 4, 4 / 3])), antialias=True),
            v2.RandomHorizontalFlip(f.get("flip_p", 0.5)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        b, label = self.s.row(self.rows[i])
        return self.t(Image.open(io.BytesIO(b)).convert("RGB")), label


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ft", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    c = tomllib.load(open(os.path.join(a.ft, "config.toml"), "rb"))
    f, t, enc, aug = c["finetune"], c.get("train", {}), c["model"]["encoder"], c.get("augment", {})
    torch.manual_seed(t.get("seed", 0))
    e = ResNet(enc.get("arch", "resnet50"), enc.get("cifar_stem", False), enc.get("width", 1.0), enc.get("stem_pool"))
    if f.get("init", "byol") == "byol":
        sd = load_file(os.path.join(f["source_checkpoint"], "online.safetensors"))
        e.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    model = nn.Sequential(e, nn.Linear(e.out_dim, len(f["classes"])))
    bf16 = c.get("resolved", {}).get("precision") == "bf16"
    mf = torch.channels_last if t.get("channels_last", True) else torch.contiguous_format
    model.to(memory_format=mf)
    ds = Subset(Shards(a.train), os.path.join(a.ft, "label_keys.txt"), aug.get("size", 224), f,
                aug.get("mean", [0.485, 0.456, 0.406]), aug.get("std", [0.229, 0.224, 0.225]))
    batch = f.get("batch", 1024)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=a.workers, drop_last=True,
                    persistent_workers=a.workers > 0)
    opt = torch.optim.SGD(model.parameters(), lr=f.get("lr", 0.02), momentum=f.get("momentum", 0.9),
                          nesterov=f.get("nesterov", True), weight_decay=f.get("weight_decay", 0.0))
    total = a.steps
    model.train()
    step, t0, warm = 0, None, 5
    while step < total:
        for x, y in dl:
            if step == warm:
                t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = f.get("lr", 0.02) * 0.5 * (1 + math.cos(math.pi * step / total))
            x = x.contiguous(memory_format=mf)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= total:
                break
    secs = time.perf_counter() - t0
    r = {"command": "finetune_torch", "steps": step, "batch": batch, "workers": a.workers,
         "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
         "images_per_s": (step - warm) * batch / secs, "seconds": secs, "last_loss": loss.item()}
    print(json.dumps(r) if a.json else f"{r['images_per_s']:.1f} images/s, loss {r['last_loss']:.4f}")


if __name__ == "__main__":
    main()
