"""Random inpainting masks for training an inpainting model (image conditioning by concatenation, issue 17).

Each training image gets one mask, 1 = to repaint (diffusers' and A1111's convention: white = repaint), drawn from
the step's generator so a resumed run draws the same masks. Kinds, with their shares:
- "full" (10%): everything masked, so the model also generates from text alone (SD-inpainting trained with 25%);
- "object" (40%): the box of one object grown by 0-6 pixels. The object is a connected region of pixels that differ
  from the image's border colour (flat backgrounds, like the shapes data: the box of one shape; on photos a
  "salient region" box); an image with no such region gets a "box" instead. Read from the pixels rather than from
  annotations, so it always matches the image after cropping and flipping;
- "box" (25%): an axis-aligned rectangle, each side 15-60% of the image's;
- "strokes" (25%): 1-3 brush strokes (polylines of 2-4 points, 3-10% of the side wide), LaMa-style free-form masks.

Written here because neither diffusers nor its training examples ship a mask sampler (their inpainting fine-tuning
scripts are community research projects, each with its own ad hoc one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

MASK_KINDS = ("full", "object", "box", "strokes")
MASK_SHARES = (0.10, 0.40, 0.25, 0.25)
OBJECT_MARGIN = (0, 6)  # pixels added around an object's box, inclusive range
BOX_SIDE = (0.15, 0.60)  # fraction of the image side
FOREGROUND_DISTANCE = 0.3  # in [-1, 1] pixel units (~40 of 255): farther than this from the border colour


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _integer(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=g))


def box_mask(height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """(H, W) float: a random rectangle of ones."""
    h = max(1, round(_uniform(g, *BOX_SIDE) * height))
    w = max(1, round(_uniform(g, *BOX_SIDE) * width))
    y, x = _integer(g, 0, height - h), _integer(g, 0, width - w)
    m = torch.zeros(height, width)
    m[y : y + h, x : x + w] = 1
    return m


def stroke_mask(height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """(H, W) float: 1-3 thick polylines (round joints), drawn with PIL."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)
    for _ in range(_integer(g, 1, 3)):
        points = [(_uniform(g) * width, _uniform(g) * height) for _ in range(_integer(g, 2, 4))]
        thickness = max(1, round(_uniform(g, 0.03, 0.10) * side))
        draw.line(points, fill=255, width=thickness, joint="curve")
        r = thickness / 2
        for x, y in points:  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(height, width).float() / 255


def foreground(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels of `image` (3, H, W) in [-1, 1] farther than FOREGROUND_DISTANCE from its median border
    colour."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 2H + 2W)
    background = border.median(dim=1).values[:, None, None]
    return (image - background).norm(dim=0) > FOREGROUND_DISTANCE


def component(fg: torch.Tensor, seed: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: the 8-connected region of `fg` holding pixel `seed` (y, x), by repeated 3x3 dilation inside fg
    (at most H * W rounds; a few tens for the shapes data)."""
    region = torch.zeros_like(fg, dtype=torch.float32)
    region[seed] = 1.0
    inside = fg.float()
    for _ in range(fg.numel()):
        grown = F.max_pool2d(region[None, None], 3, stride=1, padding=1)[0, 0] * inside
        if torch.equal(grown, region):
            break
        region = grown
    return region.bool()


def object_mask(image: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    """(H, W) float: the box, grown by a random margin, of the region around a random foreground pixel of `image`;
    None when the image has no foreground."""
    fg = foreground(image)
    points = fg.nonzero()
    if len(points) == 0:
        return None
    y, x = points[_integer(g, 0, len(points) - 1)].tolist()
    ys, xs = component(fg, (y, x)).nonzero(as_tuple=True)
    margin = _integer(g, *OBJECT_MARGIN)
    height, width = fg.shape
    y0, y1 = max(0, int(ys.min()) - margin), min(height, int(ys.max()) + 1 + margin)
    x0, x1 = max(0, int(xs.min()) - margin), min(width, int(xs.max()) + 1 + margin)
    m = torch.zeros(height, width)
    m[y0:y1, x0:x1] = 1
    return m


def random_masks(pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random mask per image of `pixels` (B, 3, H, W) in [-1, 1]: (B, 1, H, W) float in {0, 1} on pixels'
    device, 1 = repaint. Draws only from `g` (a CPU generator)."""
    images = pixels.detach().float().cpu()
    height, width = images.shape[-2:]
    shares = torch.tensor(MASK_SHARES)
    masks = []
    for image in images:
        kind = MASK_KINDS[int(torch.multinomial(shares, 1, generator=g))]
        m = None
        if kind == "full":
            m = torch.ones(height, width)
        elif kind == "object":
            m = object_mask(image, g)
        elif kind == "strokes":
            m = stroke_mask(height, width, g)
        if m is None:  # "box", or an object mask on an image without foreground
            m = box_mask(height, width, g)
        masks.append(m)
    return torch.stack(masks)[:, None].to(pixels.device)
