"""YOLO-style detector: CSP backbone, FPN/PAN-style neck, anchor-free head decoding boxes (xyxy pixels) and class scores."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores"]


@dataclass
class YoloConfig:
    image_size: int = 64
    widths: tuple = (16, 32, 64)  # stem, stage 1 (stride 4 -> /8 head), stage 2 (stride 16 head)
    num_classes: int = 8
    csp_depth: int = 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["family"] = "yolo"
        d["strides"] = [8, 16]
        return d


SIZES = {
    "tiny": YoloConfig(),
    "large": YoloConfig(image_size=640, widths=(64, 256, 512), num_classes=80, csp_depth=3),
}


class ConvAct(nn.Module):
    """Conv (BatchNorm already folded into its bias, as deployed YOLO graphs are) + SiLU."""

    def __init__(self, cin, cout, k=3, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)

    def forward(self, x):
        return F.silu(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = ConvAct(c, c, 3)
        self.cv2 = ConvAct(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class CSPBlock(nn.Module):
    """Cross-stage partial block: split channels, run bottlenecks on one half, concat every stage, 1x1 fuse."""

    def __init__(self, cin, cout, depth):
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = ConvAct(cin, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden) for _ in range(depth))
        self.cv2 = ConvAct((2 + depth) * self.hidden, cout, 1)

    def forward(self, x):
        a, b = self.cv1(x).split(self.hidden, dim=1)
        parts = [a, b]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = ConvAct(c, c // 2, 1)
        self.cv2 = ConvAct(c * 2, c, 1)

    def forward(self, x):
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        y3 = F.max_pool2d(y2, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, y3], dim=1))


class Head(nn.Module):
    def __init__(self, c, num_classes):
        super().__init__()
        self.box = nn.Sequential(ConvAct(c, c, 3), nn.Conv2d(c, 4, 1))
        self.cls = nn.Sequential(ConvAct(c, c, 3), nn.Conv2d(c, num_classes, 1))

    def forward(self, x):
        return self.box(x), self.cls(x)


def _grid_centers(size: int, stride: int) -> torch.Tensor:
    n = size // stride
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], dim=-1)  # [n*n, 2]


class YoloTiny(nn.Module):
    """forward(images [B,3,S,S]) -> boxes [B,N,4] (x1,y1,x2,y2 pixels), scores [B,N,num_classes] (sigmoid)."""

    def __init__(self, cfg: YoloConfig):
        super().__init__()
        self.config = cfg
        c0, c1, c2 = cfg.widths
        self.stem = ConvAct(3, c0, 3, 2)  # /2
        self.down1 = ConvAct(c0, c1, 3, 2)  # /4
        self.stage1 = CSPBlock(c1, c1, cfg.csp_depth)
        self.down2 = ConvAct(c1, c1, 3, 2)  # /8 -> P3
        self.stage2 = CSPBlock(c1, c1, cfg.csp_depth)
        self.down3 = ConvAct(c1, c2, 3, 2)  # /16 -> P4
        self.stage3 = CSPBlock(c2, c2, cfg.csp_depth)
        self.sppf = SPPF(c2)
        # neck: top-down (P4 -> P3) then bottom-up (P3 -> P4)
        self.reduce = ConvAct(c2, c1, 1)
        self.neck_p3 = CSPBlock(2 * c1, c1, cfg.csp_depth)
        self.neck_down = ConvAct(c1, c1, 3, 2)
        self.neck_p4 = CSPBlock(2 * c1, c2, cfg.csp_depth)
        self.head_p3 = Head(c1, cfg.num_classes)
        self.head_p4 = Head(c2, cfg.num_classes)
        self.register_buffer("centers_p3", _grid_centers(cfg.image_size, 8), persistent=False)
        self.register_buffer("centers_p4", _grid_centers(cfg.image_size, 16), persistent=False)

    @staticmethod
    def _decode(box, cls, centers, stride: float):
        box = box.flatten(2).transpose(1, 2)  # [B, HW, 4] left, top, right, bottom distances
        cls = cls.flatten(2).transpose(1, 2)
        ltrb = F.softplus(box) * stride
        xy1 = centers[None] - ltrb[..., :2]
        xy2 = centers[None] + ltrb[..., 2:]
        return torch.cat([xy1, xy2], dim=-1), torch.sigmoid(cls)

    def forward(self, images):
        x = self.stage1(self.down1(self.stem(images)))
        p3 = self.stage2(self.down2(x))
        p4 = self.sppf(self.stage3(self.down3(p3)))
        r4 = self.reduce(p4)
        n3 = self.neck_p3(torch.cat([F.interpolate(r4, scale_factor=2.0, mode="nearest"), p3], dim=1))
        n4 = self.neck_p4(torch.cat([self.neck_down(n3), r4], dim=1))
        boxes3, scores3 = self._decode(*self.head_p3(n3), self.centers_p3, 8.0)
        boxes4, scores4 = self._decode(*self.head_p4(n4), self.centers_p4, 16.0)
        return torch.cat([boxes3, boxes4], dim=1), torch.cat([scores3, scores4], dim=1)


def init_weights(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def example_inputs(cfg: YoloConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return {"images": torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen)}


def dynamic_shapes() -> tuple:
    from torch.export import Dim

    return ({0: Dim("batch")},)
