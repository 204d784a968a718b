"""Reference: a plain PyTorch BYOL training step with the same model, batch and settings
as a byol config, on views already in memory (run with the project's venv).

  byol_torch.py --config configs/fmnist.toml [--steps 30] [--warmup 5] [--channels-last] [--precision bf16] [--json]

Model: the ResNet of the config (torchvision layout: BasicBlock/Bottleneck, width
multiplier, optional CIFAR stem), projector and predictor (Linear → BN → ReLU → Linear),
target = EMA copy; symmetric 2 − 2cos loss; LARS as BYOL's official code (decay and
trust ratio on ≥2-D tensors, momentum 0.9). Prints training images/s (an image = both
views) over `--steps` timed steps after `--warmup` untimed ones.
"""

import argparse
import copy
import json
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Basic(nn.Module):
    exp = 1

    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.downsample = None
        if stride != 1 or cin != w:
            self.downsample = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottle(nn.Module):
    exp = 4

    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, w * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w * 4)
        self.downsample = None
        if stride != 1 or cin != w * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, w * 4, 1, stride, bias=False), nn.BatchNorm2d(w * 4))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, arch, cifar, width, pool=None):
        super().__init__()
        layers, block = {"resnet18": ([2, 2, 2, 2], Basic), "resnet34": ([3, 4, 6, 3], Basic),
                         "resnet50": ([3, 4, 6, 3], Bottle)}[arch]
        w = lambda c: max(1, round(c * width))
        stem = w(64)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        pool = (not cifar) if pool is None else pool
        self.maxpool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()
        cin = stem
        for li, (n, base) in enumerate(zip(layers, [64, 128, 256, 512])):
            blocks = []
            for bi in range(n):
                blocks.append(block(cin, w(base), 2 if bi == 0 and li > 0 else 1))
                cin = w(base) * block.exp
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        self.out_dim = cin

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def mlp(cin, hidden, out):
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out, bias=False))


def reg(p, z):
    return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)


def fwd(net, x, pred=True):
    z = net["projector"](net["encoder"](x))
    return net["predictor"](z) if pred else z


def train_step(online, target, opt, v1, v2, bf16):
    """One BYOL step: forward passes (bf16 autocast when asked), symmetric loss in float32,
    backward, optimizer step. The caller updates the target. Returns the loss."""
    with torch.autocast(v1.device.type, dtype=torch.bfloat16, enabled=bf16):
        p1, p2 = fwd(online, v1), fwd(online, v2)
        with torch.no_grad():
            z1, z2 = fwd(target, v1, False), fwd(target, v2, False)
    p1, p2, z1, z2 = (x.float() for x in (p1, p2, z1, z2))
    loss = (reg(p1, z2) + reg(p2, z1)).mean()
    for p in online.parameters():
        p.grad = None
    loss.backward()
    opt.step()
    return loss


class Lars:
    def __init__(self, params, lr, wd, momentum, eta):
        self.params, self.lr, self.wd, self.mu, self.eta = list(params), lr, wd, momentum, eta
        self.buf = {}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            u = p.grad
            if p.dim() > 1:
                u = u + self.wd * p
                pn, un = p.norm(), u.norm()
                u = u * torch.where((pn > 0) & (un > 0), self.eta * pn / un, torch.ones_like(pn))
            b = self.buf.get(p)
            self.buf[p] = u.clone() if b is None else b.mul_(self.mu).add_(u)
            p.sub_(self.lr * self.buf[p])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: torch.autocast(bfloat16) around the forward passes, loss in float32")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    c = tomllib.load(open(a.config, "rb"))
    m, t, o = c.get("model", {}), c.get("train", {}), c.get("optim", {})
    enc = m.get("encoder", {})
    proj, pred = m.get("projector", {}), m.get("predictor", {})
    batch, size = t.get("batch", 256), c.get("augment", {}).get("size", 224)
    dev = "cuda" if torch.cuda.is_available() and t.get("device", "auto") != "cpu" else "cpu"
    torch.manual_seed(0)
    e = ResNet(enc.get("arch", "resnet50"), enc.get("cifar_stem", False), enc.get("width", 1.0), enc.get("stem_pool"))
    online = nn.ModuleDict({"encoder": e, "projector": mlp(e.out_dim, proj.get("hidden", 4096), proj.get("out", 256)),
                            "predictor": mlp(proj.get("out", 256), pred.get("hidden", 4096), pred.get("out", 256))}).to(dev)
    target = copy.deepcopy(nn.ModuleDict({"encoder": online["encoder"], "projector": online["projector"]}))
    for p in target.parameters():
        p.requires_grad_(False)
    mf = torch.channels_last if a.channels_last else torch.contiguous_format
    online.to(memory_format=mf)
    target.to(memory_format=mf)
    opt = Lars(online.parameters(), o.get("base_lr", 0.2) * batch / 256, o.get("weight_decay", 1.5e-6),
               o.get("momentum", 0.9), o.get("trust", 1e-3))
    v1 = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=mf)
    v2 = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=mf)

    def step():
        loss = train_step(online, target, opt, v1, v2, a.precision == "bf16")
        with torch.no_grad():
            for (_, pt), (_, po) in zip(target.named_parameters(), online.named_parameters()):
                pt.lerp_(po, 0.01)
        return loss

    for _ in range(a.warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    if dev == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    r = {"command": "byol_torch", "device": dev, "batch": batch, "size": size, "steps": a.steps,
         "channels_last": a.channels_last, "precision": a.precision, "images_per_s": a.steps * batch / s, "threads": torch.get_num_threads()}
    print(json.dumps(r) if a.json else f"{r['images_per_s']:.1f} images/s (PyTorch, {dev})")


if __name__ == "__main__":
    main()
