"""Reference: a plain PyTorch BYOL training run with a torchvision DataLoader, on the
same shards, config and schedule as `byol train` (run with the project's venv).

  byol_torch_train.py --config configs/fmnist.toml --data data/fmnist/train --out runs/torch-ref
                      [--epochs N] [--workers 2] [--max-steps N] [--json]

What a user's PyTorch script does today: a Dataset over the Parquet shards (PIL decode),
torchvision.transforms.v2 two-view augmentation per sample in DataLoader worker
processes, the model of `byol_torch.py` (torchvision layout, same widths and heads),
LARS with linear warm-up then cosine learning rate, τ on the cosine schedule, EMA
target, symmetric 2 − 2cos loss, channels-last and bf16 autocast (torch.autocast, loss in
float32) when the config says so (`train.channels_last`, `train.precision`), as byol does.

The online network is written in byol's checkpoint layout (RUN/config.toml and
RUN/checkpoints/step-N/{online.safetensors,state.json}), with torchvision parameter names,
so `byol eval --run RUN` evaluates it with exactly the same probes as a byol run. Prints
(or with --json writes on stdout) the training time and images/s (an image = both views).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
import tomllib

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byol_torch import Lars, ResNet, mlp, train_step  # noqa: E402
from byol_settings import load_augment  # noqa: E402
from torchvision_two_views import Shards, TwoViews  # noqa: E402


def views(c):
    """byol's augmentation settings for config `c`: its [augment] over the defaults."""
    a = load_augment(None)
    for key, value in c.get("augment", {}).items():
        if key in ("view1", "view2"):
            a[key].update(value)
        else:
            a[key] = value
    return a


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    c = tomllib.load(open(a.config, "rb"))
    m, t, o = c.get("model", {}), c.get("train", {}), c.get("optim", {})
    if a.epochs is not None:
        t["epochs"] = a.epochs
    epochs, batch, seed = t.get("epochs", 100), t.get("batch", 256), t.get("seed", 0)
    dev = "cuda" if torch.cuda.is_available() and t.get("device", "auto") != "cpu" else "cpu"
    torch.manual_seed(seed)
    enc, proj, pred = m.get("encoder", {}), m.get("projector", {}), m.get("predictor", {})
    arch = (enc.get("arch", "resnet50"), enc.get("cifar_stem", False), enc.get("width", 1.0), enc.get("stem_pool"))
    e = ResNet(*arch)
    online = nn.ModuleDict({"encoder": e, "projector": mlp(e.out_dim, proj.get("hidden", 4096), proj.get("out", 256)),
                            "predictor": mlp(proj.get("out", 256), pred.get("hidden", 4096), pred.get("out", 256))})
    target = nn.ModuleDict({"encoder": ResNet(*arch),
                            "projector": mlp(e.out_dim, proj.get("hidden", 4096), proj.get("out", 256))})
    target.load_state_dict({k: v for k, v in online.state_dict().items() if not k.startswith("predictor.")})
    for p in target.parameters():
        p.requires_grad_(False)
    mf = torch.channels_last if t.get("channels_last", True) else torch.contiguous_format
    # The precision byol resolved for the run (config.toml's [resolved]), else the setting:
    # "auto" means bf16 only where it is native, which a byol run folder records.
    precision = c.get("resolved", {}).get("precision") or t.get("precision", "auto")
    bf16 = precision == "bf16" or (precision == "auto" and dev == "cuda")
    online.to(dev, memory_format=mf)
    target.to(dev, memory_format=mf)

    ds = TwoViews(Shards(a.data), views(c))
    gen = torch.Generator().manual_seed(seed)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=a.workers, drop_last=True,
                    persistent_workers=a.workers > 0, generator=gen, pin_memory=dev == "cuda")
    spe = len(dl)
    total = t.get("total_steps", 0) or spe * epochs  # a time-budgeted run fixes total_steps
    stop = min(total, a.max_steps or total)
    peak = o.get("base_lr", 0.2) * batch / 256
    warm = round(o.get("warmup_epochs", 10.0) * spe)
    tau_base = t.get("tau_base", 0.99)
    opt = Lars(online.parameters(), peak, o.get("weight_decay", 1.5e-6), o.get("momentum", 0.9), o.get("trust", 1e-3))
    on_params = [p for n, p in online.named_parameters() if not n.startswith("predictor.")]
    ta_params = list(target.parameters())

    def lr_at(k):
        if k < warm:
            return peak * k / warm
        return peak * 0.5 * (1 + math.cos(math.pi * min(k - warm, total - warm) / max(total - warm, 1)))

    def tau_at(k):
        return 1 - (1 - tau_base) * (math.cos(math.pi * min(k, total) / max(total, 1)) + 1) / 2

    online.train()
    target.train()
    step, loss_v, t0 = 0, float("nan"), time.perf_counter()
    first_batch_s = None
    while step < stop:
        for v1, v2, _ in dl:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
            v1 = v1.to(dev, non_blocking=True).contiguous(memory_format=mf)
            v2 = v2.to(dev, non_blocking=True).contiguous(memory_format=mf)
            opt.lr = lr_at(step)
            loss = train_step(online, target, opt, v1, v2, bf16)
            with torch.no_grad():
                torch._foreach_lerp_(ta_params, on_params, 1 - tau_at(step))
            step += 1
            if step % 50 == 0 or step == stop:
                loss_v = loss.item()
                el = time.perf_counter() - t0
                print(f"step {step}/{stop} epoch {(step - 1) // spe} loss {loss_v:.4f} "
                      f"{step * batch / el:.0f} img/s", file=sys.stderr, flush=True)
            if step >= stop:
                break
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    loss_v = loss.item()

    ck = os.path.join(a.out, "checkpoints", f"step-{step:09d}")
    tmp = ck + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = {k: v.detach().contiguous().cpu() for k, v in online.state_dict().items() if "num_batches_tracked" not in k}
    save_file(sd, os.path.join(tmp, "online.safetensors"))
    state = {"step": step, "cursor": {"epoch": step // spe, "consumed": 0}, "aug_rng": 0, "last_loss": loss_v,
             "config": {}}
    json.dump(state, open(os.path.join(tmp, "state.json"), "w"))
    shutil.rmtree(ck, ignore_errors=True)
    os.rename(tmp, ck)
    shutil.copy(a.config, os.path.join(a.out, "config.toml"))  # model shape and eval size for `byol eval`
    r = {"command": "byol_torch_train", "device": dev, "precision": "bf16" if bf16 else "fp32", "epochs": epochs, "steps": step, "batch": batch,
         "workers": a.workers, "threads": torch.get_num_threads(), "train_seconds": secs,
         "first_batch_seconds": first_batch_s, "images_per_s": step * batch / secs, "last_loss": loss_v,
         "checkpoint": ck}
    print(json.dumps(r) if a.json else f"{r['images_per_s']:.1f} images/s over {secs:.0f} s, loss {loss_v:.4f}")


if __name__ == "__main__":
    main()
