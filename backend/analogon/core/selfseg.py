"""Unsupervised self-segmentation from attention maps (after Patashnik et al., "Localizing
Object-level Shape Variations with Text-to-Image Diffusion Models", as Cross-Image Attention uses
it for its AdaIN masks), in torch only and deterministic.

1. Each pixel's row of the (head- and layer-averaged) decoder self-attention map is a feature:
   pixels of one object attend to the same places. k-means (k-means++ seeding from a fixed seed,
   Lloyd iterations, best of a few starts) splits the pixels into ``k`` segments.
2. Which segments are the object (``rule``):
   - ``"noun"`` (the paper's): the cross-attention map of the object's noun (the prompt's domain
     word), normalised to [0, 1], scores each segment by its mean; segments scoring above
     ``ratio`` × the mean score of the other segments are the object (authors' ratio 1.4). It
     needs a text encoder that knows the word and where it is: with a word the encoder never
     learnt, the map picks the outline or the backdrop (toy-sd, "shape": IoU 0.10–0.14 with the
     object).
   - ``"border"``: the segments that do not touch the image's border (the boundary prior of
     salient-object detection: the backdrop reaches the frame, a subject inside it does not).
   - ``"auto"``: the segments off the border, and of those on it the ones the noun rule picks
     where together they hold at most half the border (an object cut by the frame keeps its cut
     part; a noun map that lights the backdrop adds nothing); where every segment touches the
     border the prior says nothing and the noun rule alone decides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, n_init: int = 3) -> torch.Tensor:
    """Cluster the rows of x (N, D); returns labels (N,) long. Deterministic for a given seed."""
    x = x.float()
    n = x.shape[0]
    k = max(1, min(int(k), n))
    best_labels, best_inertia = None, float("inf")
    for run in range(n_init):
        g = torch.Generator(device="cpu").manual_seed(seed + run)
        # k-means++ seeding
        first = int(torch.randint(n, (1,), generator=g))
        centers = [x[first]]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for _ in range(1, k):
            total = float(d2.sum())
            if total <= 0:
                idx = int(torch.randint(n, (1,), generator=g))
            else:
                p = (d2 / total).cpu()
                idx = int(torch.multinomial(p, 1, generator=g))
            centers.append(x[idx])
            d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
        c = torch.stack(centers)
        labels = torch.zeros(n, dtype=torch.long, device=x.device)
        for it in range(iters):
            dist = torch.cdist(x, c)
            new = dist.argmin(1)
            if it > 0 and torch.equal(new, labels):
                break
            labels = new
            for j in range(k):
                sel = labels == j
                if sel.any():
                    c[j] = x[sel].mean(0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels.clone()
    return best_labels


RULES = ("auto", "noun", "border")


def _noun_segments(labels: torch.Tensor, noun_map: torch.Tensor | None, ratio: float) -> set[int]:
    """The segments whose mean noun score is above ``ratio`` × the others' mean (the paper)."""
    if noun_map is None:
        return set()
    h, w = labels.shape
    m = noun_map.float().reshape(h, w)
    m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
    ks = int(labels.max()) + 1
    scores = torch.stack([m[labels == j].mean() if (labels == j).any() else m.new_tensor(0.0)
                          for j in range(ks)])
    top = int(scores.argmax())
    others = torch.cat([scores[:top], scores[top + 1:]])
    thr = ratio * others.mean()
    return {j for j in range(ks) if scores[j] > thr}


def _ring(labels: torch.Tensor) -> torch.Tensor:
    """The labels of the grid's outer ring (corners twice, which does not matter for shares)."""
    return torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])


def object_mask(self_map: torch.Tensor, grid_hw: tuple[int, int], noun_map: torch.Tensor | None,
                k: int = 5, ratio: float = 1.4, seed: int = 0, rule: str = "auto") -> torch.Tensor:
    """A binary (h, w) float mask of the object from a self-attention map (S, S) over an h×w grid
    and the noun's cross-attention map (S,) on the same grid (``rule``: see the module). Empty
    when no segment qualifies (e.g. the noun rule without a noun map)."""
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}")
    h, w = grid_hw
    labels = kmeans(self_map, k, seed=seed).reshape(h, w)
    ks = int(labels.max()) + 1
    if ks < 2:
        return torch.ones((h, w), dtype=torch.float32, device=self_map.device)
    ring = _ring(labels)
    on_border = {int(j) for j in ring.unique()}
    inside = set(range(ks)) - on_border
    if rule == "noun" or (rule == "auto" and not inside):
        fg = _noun_segments(labels, noun_map, ratio)
    elif rule == "border":
        fg = inside
    else:
        cut = _noun_segments(labels, noun_map, ratio) & on_border
        share = sum(int((ring == j).sum()) for j in cut) / ring.numel()
        fg = inside | (cut if share <= 0.5 else set())  # the frame is mostly backdrop
    mask = torch.zeros((h, w), dtype=torch.float32, device=self_map.device)
    for j in fg:
        mask[labels == j] = 1.0
    return mask


def to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) mask to (1, 1, H, W) at latent size, nearest neighbour (keeps it binary)."""
    return F.interpolate(mask[None, None].float(), size=tuple(latent_hw), mode="nearest")


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens inside the tokenized ``prompt`` (with its start token), or []."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    if not sub:
        return []
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    # a word at the start of a prompt may tokenize differently; try with a leading space
    sub = tokenizer(" " + word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []
