"""Differential frame pruning: equal to an independent re-computation and to transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vl3cli.pruning import prune_mask

P = 14


def reference(pixel_values, grid, m, threshold):
    """The rule written out token by token, in float64 (far from ties in these tests)."""
    t, h, w = grid
    x = pixel_values.double().view(t, h // m, w // m, m * m * 3 * P * P)  # rows already window-ordered
    keep = []
    for f in range(t):
        row = []
        for i in range(h // m):
            for j in range(w // m):
                if f == 0:
                    row.append(True)
                else:
                    diff = (x[f, i, j] - x[f - 1, i, j]).abs().mean().item() * 255
                    row.append(diff > threshold)
        if not any(row):
            row[0] = True
        keep.extend(row)
    return torch.tensor(keep)


def video(t, h, w, m, seed=0, change=0.3):
    """Random normalised video where each token changes with probability ``change``."""
    g = torch.Generator().manual_seed(seed)
    tokens = (h // m) * (w // m)
    frames = [torch.rand(tokens, m * m * 3 * P * P, generator=g) * 2 - 1]
    for _ in range(1, t):
        moved = torch.rand(tokens, 1, generator=g) < change
        step = torch.rand(tokens, m * m * 3 * P * P, generator=g) * 0.01  # some tiny, some not
        frames.append(torch.where(moved, frames[-1] + step, frames[-1]))
    return torch.cat(frames).contiguous()  # (t*tokens*m*m... ) rows in token order


@pytest.mark.parametrize("t,h,w,m", [(5, 4, 6, 2), (3, 2, 2, 2), (4, 3, 5, 1), (2, 8, 8, 2)])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 2.0])
def test_matches_independent_rule(t, h, w, m, threshold):
    pv = video(t, h, w, m, seed=t * 100 + h).view(t * h * w, 3 * P * P)
    got = prune_mask(pv, (t, h, w), m, threshold=threshold)
    assert got.dtype == torch.bool and got.shape == (t * (h // m) * (w // m),)
    assert torch.equal(got, reference(pv, (t, h, w), m, threshold))


def transformers_compression_mask():
    """transformers' ``_get_compression_mask``, taken from its source file: importing the
    module needs torchvision, which the method itself does not use."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None:
        pytest.skip("transformers is not installed")
    path = Path(spec.origin).parent / "models/video_llama_3/video_processing_video_llama_3.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_get_compression_mask")
    namespace = {"torch": torch}
    exec(compile(ast.Module([fn], []), str(path), "exec"), namespace)  # noqa: S102 - trusted local source
    return namespace["_get_compression_mask"]


def test_matches_transformers():
    get_mask = transformers_compression_mask()
    for seed, (t, h, w) in enumerate([(6, 4, 4), (2, 6, 8), (9, 2, 4)]):
        pv = video(t, h, w, 2, seed=seed, change=0.5).view(t * h * w, 3 * P * P)
        ref = get_mask(None, pv, torch.tensor([[t, h, w]]), torch.tensor([2]), threshold=0.1)
        assert torch.equal(prune_mask(pv, (t, h, w), 2), ref)


def test_frame_zero_whole_static_frames_keep_first_token():
    t, h, w, m = 4, 4, 4, 2
    frame = torch.rand(h * w, 3 * P * P)
    pv = frame.repeat(t, 1)  # a static video
    keep = prune_mask(pv, (t, h, w), m).view(t, -1)
    assert keep[0].all()
    assert keep[1:].sum(dim=1).tolist() == [1, 1, 1]
    assert keep[1:, 0].all()


def test_single_frame_never_pruned():
    pv = torch.zeros(16, 3 * P * P)
    assert prune_mask(pv, (1, 4, 4), 2).all()


def test_threshold_is_strict_and_scaled_by_255():
    # one token of 2x2 patches; frame 1 differs by exactly d everywhere
    d = 0.5 / 255
    pv = torch.cat([torch.zeros(4, 3 * P * P), torch.full((4, 3 * P * P), d)])
    two = torch.cat([pv, torch.zeros(4, 3 * P * P)])  # frame 2 back to zeros
    assert prune_mask(two, (3, 2, 2), 2, threshold=0.4).tolist() == [True, True, True]
    assert prune_mask(two, (3, 2, 2), 2, threshold=0.6).tolist() == [True, True, True]  # min one token
    big = torch.cat([torch.zeros(8, 3 * P * P), torch.full((8, 3 * P * P), d)])  # 2 tokens per frame
    assert prune_mask(big, (2, 2, 4), 2, threshold=0.4).tolist() == [True, True, True, True]
    assert prune_mask(big, (2, 2, 4), 2, threshold=0.6).tolist() == [True, True, True, False]


def test_uint8_patches_prune_as_their_normalised_values_with_per_channel_statistics():
    """With a mean and std that differ per channel, uint8 patches and a table give the mask of
    the float values (x / 255 - mean_c) / std_c computed by hand, patch row by patch row."""
    from vl3cli.preprocess import normalise_table

    t, h, w, m, p = 4, 4, 6, 2, 2
    gen = torch.Generator().manual_seed(8)
    patches = torch.randint(0, 256, (t * h * w, 3 * p * p), generator=gen, dtype=torch.uint8)
    patches = patches.clamp(20, 235)
    patches[h * w : 2 * h * w] = patches[: h * w]  # frame 1 repeats frame 0...
    patches[h * w + 7, 0:4] += 10  # ...but for the red channel of the 4th patch of its 2nd token
    mean, std = (0.25, 0.5, 0.75), (0.25, 0.5, 1.0)
    table = torch.from_numpy(normalise_table(mean, std))
    rows = patches.double().view(-1, 3, p * p) / 255
    by_hand = ((rows - torch.tensor(mean, dtype=torch.float64)[:, None]) / torch.tensor(std, dtype=torch.float64)[:, None])
    floats = by_hand.view(patches.shape).float()
    # that token's mean change: 4 red values by 10 levels over 48 values, red std 0.25 -> 10 * 4 / 48 / 0.25
    for threshold in (0.5, 3.0, 3.5):
        expected = prune_mask(floats, (t, h, w), m, threshold=threshold)
        assert expected.view(t, -1)[1, 1].item() == (threshold < 10 * 4 / 48 / 0.25)  # (token 0: min_tokens)
        assert torch.equal(prune_mask(patches, (t, h, w), m, threshold=threshold, table=table), expected)
