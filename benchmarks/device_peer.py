"""The peer's train step on whatever device PyTorch has (device_check.sh's other half).

lightly's SimCLR as its docs set it up (SimCLRProjectionHead, NTXentLoss, SGD) on torchvision's
ResNet-18/50 or the 4-conv small CNN, in the layout PyTorch users run on a GPU: channels-last and
autocast (bfloat16 where the device supports it, else float16 with a GradScaler), views separate.
Random tensors on the device: the step alone, no input pipeline. Prints one JSON line per case.

    python benchmarks/device_peer.py --case resnet50:224:256 --case small:32:1024 --steps 20

When lightly cannot be imported (a machine without it), the same head and loss are defined here
(the JSON says "lightly": false): SimCLRProjectionHead is Linear(no bias)-BatchNorm-ReLU-Linear and
NTXentLoss the 2N-way cross-entropy over cosine / T with the positive pair as the target.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

try:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    HAVE_LIGHTLY = True
except ImportError:  # the same modules, written out
    HAVE_LIGHTLY = False

    class SimCLRProjectionHead(nn.Sequential):
        def __init__(self, din, hidden, dout):
            super().__init__(nn.Linear(din, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dout))

    class NTXentLoss(nn.Module):
        def __init__(self, temperature=0.5):
            super().__init__()
            self.t = temperature

        def forward(self, z0, z1):
            z = nn.functional.normalize(torch.cat([z0, z1]).float(), dim=1)
            s = z @ z.T / self.t
            s.fill_diagonal_(float("-inf"))
            n = len(z0)
            target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            return nn.functional.cross_entropy(s, target)


def backbone(name: str, size: int):
    """The backbone our encoder of that name is (nn/models.py): the small CNN, or torchvision's
    ResNet-18/50 with the small-image stem (3x3/1 conv, no max-pool) below 96 px and their own
    ImageNet stem from 96 px up."""
    if name == "small":
        def blk(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        return nn.Sequential(*blk(3, 32, 1), *blk(32, 64, 2), *blk(64, 128, 2), *blk(128, 256, 2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256
    m = getattr(torchvision.models, name)()
    dim = m.fc.in_features
    if size < 96:
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m, dim


def run_case(name: str, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    bb, dim = backbone(name, size)
    head = SimCLRProjectionHead(dim, dim, 128)
    model = nn.Sequential(bb, head).to(device, memory_format=torch.channels_last)
    crit = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.06 * batch / 128, momentum=0.9, weight_decay=5e-4)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler(enabled=cuda and amp == torch.float16)
    x0, x1 = (torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
              for _ in range(2))

    def step():
        with torch.autocast(device.type, dtype=amp):
            loss = crit(model(x0), model(x1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(model=name, image_size=size, batch=batch, steps=steps, amp=str(amp).replace("torch.", ""),
                channels_last=True, views="separate", first_step_s=round(first, 3), median_step_s=round(med, 5),
                pairs_per_s=round(batch / med, 2), lightly=HAVE_LIGHTLY, torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", required=True, metavar="MODEL:SIZE:BATCH")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    for case in a.case:
        name, size, batch = case.split(":")
        try:
            row = run_case(name, int(size), int(batch), a.steps, a.warmup, device)
        except Exception as e:  # noqa: BLE001 (one case failing, e.g. out of memory, must not lose the others)
            row = dict(model=name, image_size=int(size), batch=int(batch), error=f"{type(e).__name__}: {e}"[:300])
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
