"""Decode kernels (leank_ref.kernels): dense and LeanK Triton kernels against independent references.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before
``leank_ref.kernels`` is imported (``make test`` sets TRITON_INTERPRET=1 for the whole run; this
module sets it too when it is imported first). Shapes are tiny and float32 on CPU: the interpreter
runs every program in numpy. bf16 and the speed are checked on the GPU by benchmarks/decode_kernels.py.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from leank_ref.kernels import (  # noqa: E402
    DecodeConfig,
    LeanKDecoder,
    dense_decode,
    dense_decode_reference,
    launch,
    leank_decode,
    leank_decoder,
    leank_kernel,
)
from leank_ref.kernels.launch import check_runnable, plan_splits  # noqa: E402

from leank_ref.attention import simulate_newest_query  # noqa: E402
from leank_ref.decode import leank_decode_torch  # noqa: E402
from leank_ref.layout import HeadGroups, MiddleGroup, leank_layout_from_dense  # noqa: E402
from leank_ref.windows import Windows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32  # exact (ieee) products in tl.dot: errors are rounding only
TOL = {"atol": 2e-5, "rtol": 1e-4}

if DEVICE == "cpu" and not launch.INTERPRETED:
    pytest.fail(
        "leank_ref.kernels was first imported while TRITON_INTERPRET was unset or 0, so its kernels cannot run "
        "on this CPU-only machine: run the tests with TRITON_INTERPRET=1 (make test does)",
        pytrace=False,
    )


def randn(*shape: int, seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Deterministic standard normal tensor on the test device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def qkv(B: int, H: int, G: int, N: int, D: int, seed: int = 0, dtype: torch.dtype = DTYPE):
    """q [B, H, D] and a dense cache k, v [B, G, N, D]; keys scaled up so the softmax is not flat."""
    return (
        randn(B, H, D, seed=seed, dtype=dtype),
        2 * randn(B, G, N, D, seed=seed + 1, dtype=dtype),
        randn(B, G, N, D, seed=seed + 2, dtype=dtype),
    )


def sdpa_expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """torch's SDPA with each KV head repeated for its H/G query heads: [B, H, D]."""
    R = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None], k.float().repeat_interleave(R, 1), v.float().repeat_interleave(R, 1), scale=scale
    )
    return out[:, :, 0]


def layout(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, sink: int, recent: int):
    """The compact layout of a dense cache: sink tokens, then the middle, then `recent` tokens (no blocks)."""
    return leank_layout_from_dense(k, v, keep, Windows(sink, recent, 1))


def reference(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, groups, lengths=None) -> torch.Tensor:
    """The project's torch LeanK attention over the compact layout, default scale."""
    return leank_decode_torch(q, k_full, v_full, groups, q.shape[-1] ** -0.5, lengths)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, sink: int, recent: int):
    """LeanK's attention on the dense cache, by torch SDPA: middle keys with pruned channels zeroed, [B, H, D].

    The middle tokens ``[sink, N - recent)`` see K times the 0/1 mask; a head that keeps no channel skips them.
    Independent of the compact layout (no gather, no groups).
    """
    B, H, D = q.shape
    G, N = k.shape[1], k.shape[2]
    R = H // G
    mid = slice(sink, max(sink, N - recent))
    k = k.float().clone()
    k[:, :, mid] *= keep.bool()[None, :, None, :].float()
    allowed = torch.ones(B, G, N, dtype=torch.bool, device=q.device)
    allowed[:, keep.bool().sum(1) == 0, mid] = False
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None],
        k.repeat_interleave(R, 1),
        v.float().repeat_interleave(R, 1),
        attn_mask=allowed.repeat_interleave(R, 1)[:, :, None],  # [B, H, 1, N]
    )
    return out[:, :, 0]


def random_keep(G: int, D: int, counts: list[int], seed: int) -> torch.Tensor:
    """Bool [G, D]: head g keeps counts[g] random channels."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(G, D, dtype=torch.bool)
    for head, c in enumerate(counts):
        keep[head, torch.randperm(D, generator=g)[:c]] = True
    return keep.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Dense kernel
# ----------------------------------------------------------------------------------------------
DENSE_CASES = [
    # B, H, G, N, D, num_splits, config
    pytest.param(1, 4, 4, 1, 64, None, None, id="MHA-one-token"),
    pytest.param(1, 8, 2, 63, 64, None, None, id="N-below-block"),
    pytest.param(2, 8, 2, 64, 64, None, None, id="N-equals-block"),
    pytest.param(3, 8, 4, 65, 64, 2, None, id="N-above-block-2-splits"),
    pytest.param(2, 16, 4, 200, 128, None, None, id="D128-B2"),
    pytest.param(1, 8, 2, 300, 64, None, DecodeConfig(block_n=32, min_tokens_per_split=64), id="auto-4-splits"),
    pytest.param(2, 8, 2, 100, 128, 7, None, id="7-splits-not-whole-blocks"),
    pytest.param(1, 32, 1, 40, 64, 20, None, id="group-32-20-splits"),
    pytest.param(1, 8, 2, 3, 64, 8, None, id="more-splits-than-tokens"),
]


@pytest.mark.parametrize("B, H, G, N, D, splits, config", DENSE_CASES)
def test_dense_matches_sdpa(B, H, G, N, D, splits, config):
    q, k, v = qkv(B, H, G, N, D, seed=N + D)
    out = dense_decode(q, k, v, num_splits=splits, config=config or DecodeConfig())
    assert out.shape == (B, H, D) and out.dtype == DTYPE
    torch.testing.assert_close(out, sdpa_expanded(q, k, v), **TOL)


def test_split_plans_cover_every_token_without_empty_splits():
    cpu = torch.device("cpu")
    for n in (1, 63, 64, 65, 300, 4097):
        for config in (DecodeConfig(), DecodeConfig(block_n=32, min_tokens_per_split=64)):
            for splits_asked in (None, 1, 3, 7, 5000):
                splits, per = plan_splits(n, 2, cpu, config, splits_asked)
                assert splits * per >= n and (splits - 1) * per < n, (n, config, splits_asked, splits, per)
    assert plan_splits(300, 2, cpu, DecodeConfig(block_n=32, min_tokens_per_split=64)) == (4, 96)


def test_dense_custom_scale_and_strided_cache():
    """A preallocated cache read up to N (strided views) and a non-default softmax scale."""
    B, H, G, N, D = 2, 8, 2, 70, 64
    q_big = randn(B, H, 2 * D, seed=1)
    k_big, v_big = 2 * randn(B, G, 128, D, seed=2), randn(B, G, 128, D, seed=3)
    q, k, v = q_big[..., :D], k_big[:, :, :N], v_big[:, :, :N]
    assert not (q.is_contiguous() or k.is_contiguous())
    out = dense_decode(q, k, v, scale=0.3, num_splits=3)
    torch.testing.assert_close(out, sdpa_expanded(q, k, v, scale=0.3), **TOL)


def test_dense_reference_matches_sdpa():
    q, k, v = qkv(2, 8, 2, 50, 64, seed=5)
    torch.testing.assert_close(dense_decode_reference(q, k, v), sdpa_expanded(q, k, v), **TOL)


def test_dense_float16():
    q, k, v = qkv(2, 8, 4, 100, 64, seed=7, dtype=torch.float16)
    out = dense_decode(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), sdpa_expanded(q, k, v), atol=2e-3, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# LeanK kernel
# ----------------------------------------------------------------------------------------------
LEANK_CASES = [
    # B, H, G, N, D, kept counts per KV head, sink, recent, config
    pytest.param(1, 8, 4, 150, 64, [0, 16, 48, 64], 16, 40, None, id="counts-0-a-3a-D"),
    pytest.param(
        2,
        8,
        4,
        120,
        128,
        [32, 0, 128, 96],
        8,
        16,
        DecodeConfig(block_n=16, min_tokens_per_split=16),
        id="D128-B2-several-splits",
    ),
    pytest.param(1, 4, 2, 40, 64, [16, 16], 16, 16, None, id="one-group-of-two-middle-below-block"),
    pytest.param(2, 8, 4, 50, 64, [0, 0, 0, 0], 16, 16, None, id="all-heads-zero"),
    pytest.param(1, 8, 4, 30, 64, [0, 16, 32, 64], 16, 16, None, id="no-middle-tokens"),
    pytest.param(1, 8, 2, 20, 64, [0, 32], 0, 1, None, id="no-sink-recent-1"),
]


@pytest.mark.parametrize("B, H, G, N, D, counts, sink, recent, config", LEANK_CASES)
def test_leank_matches_references(B, H, G, N, D, counts, sink, recent, config):
    q, k, v = qkv(B, H, G, N, D, seed=N + D + 100)
    keep = random_keep(G, D, counts, seed=N)
    k_full, v_full, groups = layout(k, v, keep, sink, recent)
    out = leank_decode(q, k_full, v_full, groups, config=config or DecodeConfig())
    assert out.shape == (B, H, D) and out.dtype == DTYPE
    torch.testing.assert_close(out, reference(q, k_full, v_full, groups), **TOL)
    expected = masked_sdpa(q, k, v, keep, sink, recent)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(out, simulate_newest_query(q, k, v, keep, sink, recent), **TOL)
    if N > sink + recent and any(0 < c < D for c in counts):  # the pruning must matter in this case
        assert not torch.allclose(out, sdpa_expanded(q, k, v), atol=1e-3)


def _decoder_inputs(B, H, G, N, D, counts, sink, recent, seed):
    """A dense cache, its LeanK layout and the head grouping of the same keep mask."""
    q, k, v = qkv(B, H, G, N, D, seed=seed)
    keep = random_keep(G, D, counts, seed=seed + 1)
    k_full, v_full, groups = layout(k, v, keep, sink, recent)
    return q, k, v, keep, k_full, v_full, groups


def test_merge_in_one_launch_ignores_garbage_scratch_and_resets_its_counters():
    """Several splits per part on any number of SMs; scratch poisoned with NaN and huge lse; called twice."""
    B, H, G, N, D, sink, recent = 2, 8, 4, 200, 64, 8, 16
    # programs_per_sm=64 asks for >= 64 * SMs / rows splits, at least 8 here even with one SM; 16 tokens per split.
    config = DecodeConfig(block_n=16, min_tokens_per_split=16, programs_per_sm=64)
    q, k, v, keep, k_full, v_full, groups = _decoder_inputs(B, H, G, N, D, [16, 0, 48, 16], sink, recent, seed=31)
    heads = HeadGroups.from_mask(keep)
    decoder = LeanKDecoder(heads, B, H, DTYPE, DEVICE, k_full.shape[2], groups[0].k.shape[2], config=config)
    assert decoder.full_splits > 1 and min(decoder.mid_splits) > 1  # so partials really are merged, across parts
    decoder.o_part.fill_(float("nan"))
    decoder.lse_part.fill_(1e4)
    expected = masked_sdpa(q, k, v, keep, sink, recent)
    mid = ([g.k for g in groups], [g.v for g in groups])
    out = decoder(q, k_full, v_full, *mid, (k_full.shape[2], groups[0].k.shape[2]))
    torch.testing.assert_close(out, expected, **TOL)
    assert not decoder.count.any()  # the last program of each head reset its counter
    q2 = randn(B, H, D, seed=77)
    out2 = decoder(q2, k_full, v_full, *mid, (k_full.shape[2], groups[0].k.shape[2]))
    assert out2.data_ptr() == out.data_ptr()  # the same output buffer every step: no allocation
    torch.testing.assert_close(out2, masked_sdpa(q2, k, v, keep, sink, recent), **TOL)


def test_decoder_reads_lengths_from_the_device_and_any_full_window_order():
    """What a CUDA graph replays: preallocated buffers, lengths in a device tensor, the full window as a ring."""
    B, H, G, D, sink, recent, cap = 1, 8, 4, 64, 8, 16, 96
    counts = [32, 0, 16, 16]
    q, k, v = qkv(B, H, G, sink + recent + 60, D, seed=41)
    keep = random_keep(G, D, counts, seed=42)
    heads = HeadGroups.from_mask(keep.cpu())
    decoder = LeanKDecoder(heads, B, H, DTYPE, DEVICE, sink + recent, cap)
    lengths = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for n in (sink + recent - 5, sink + recent + 1, sink + recent + 60):  # no middle yet, then a growing middle
        k_full, v_full, groups = layout(k[:, :, :n], v[:, :, :n], keep, sink, recent)
        nm = groups[0].k.shape[2] if groups else 0
        roll = torch.roll(torch.arange(k_full.shape[2]), 5).to(DEVICE)  # ring order: attention ignores order
        kf, vf = (t.new_zeros(B, G, sink + recent, D) for t in (k_full, v_full))
        kf[:, :, : k_full.shape[2]], vf[:, :, : k_full.shape[2]] = k_full[:, :, roll], v_full[:, :, roll]
        mid_k = [torch.zeros(B, len(h), cap, c, device=DEVICE) for h, c in zip(heads.kv_heads, heads.counts)]
        mid_v = [torch.zeros(B, len(h), cap, D, device=DEVICE) for h in heads.kv_heads]
        for grp, mk, mv in zip(groups, mid_k, mid_v):
            mk[:, :, :nm], mv[:, :, :nm] = grp.k, grp.v
        lengths.copy_(torch.tensor([k_full.shape[2], nm]))
        out = decoder(q, kf, vf, mid_k, mid_v, lengths)
        torch.testing.assert_close(out, masked_sdpa(q, k[:, :, :n], v[:, :, :n], keep, sink, recent), **TOL)


def _poisoned_decoder_inputs(n_full_view: int, n_mid_view: int):
    """A decoder and its cache as views into NaN-poisoned buffers: any read past a view's tokens turns up NaN."""
    B, H, G, D, sink, recent = 2, 8, 4, 64, 8, 16
    q, k, v = qkv(B, H, G, sink + recent + n_mid_view, D, seed=51)
    keep = random_keep(G, D, [32, 0, 16, 16], seed=52)
    k_full, v_full, groups = layout(k, v, keep, sink, recent)
    heads = HeadGroups.from_mask(keep.cpu())
    decoder = LeanKDecoder(heads, B, H, DTYPE, DEVICE, sink + recent, n_mid_view)
    full = [torch.full((B, G, n_full_view + 8, D), float("nan"), device=DEVICE) for _ in range(2)]
    for buf, t in zip(full, (k_full, v_full)):
        buf[:, :, : t.shape[2]] = t
    mids = []
    for grp in groups:
        for t in (grp.k, grp.v):
            buf = torch.full((B, t.shape[1], n_mid_view + 8, t.shape[3]), float("nan"), device=DEVICE)
            buf[:, :, : t.shape[2]] = t
            mids.append(buf)
    views = ([f[:, :, :n_full_view] for f in full], [m[:, :, :n_mid_view] for m in mids])
    (kf, vf), mid = views
    return decoder, q, kf, vf, mid[0::2], mid[1::2], (k_full, v_full, groups)


@pytest.mark.parametrize(
    "lengths, match",
    [
        ((0, 10), "n_full=0 .* need 1 <= n_full <= 24"),
        ((-3, 10), "n_full=-3"),
        ((25, 10), "n_full=25 but the full window k_full, v_full holds 24 tokens"),
        ((24, -1), "n_mid=-1 but the middle buffers hold 40 tokens"),
        ((24, 41), "n_mid=41 .* need 0 <= n_mid <= 40"),
        ((24.0, 10), "must be Python ints"),
        ((24,), "must be Python ints"),
    ],
    ids=["n_full-0", "n_full-negative", "n_full-past-buffer", "n_mid-negative", "n_mid-past-buffer", "float", "one"],
)
def test_host_lengths_are_checked_against_the_buffers(lengths, match):
    decoder, q, kf, vf, mid_k, mid_v, _ = _poisoned_decoder_inputs(24, 40)
    error = TypeError if match.startswith("must") else ValueError
    with pytest.raises(error, match=match):
        decoder(q, kf, vf, mid_k, mid_v, lengths)
    with pytest.raises(ValueError, match="int32 tensor"):
        decoder(q, kf, vf, mid_k, mid_v, torch.tensor([24, 10], device=DEVICE))  # int64


@pytest.mark.parametrize(
    "asked, clamped",
    [((0, 40), (1, 40)), ((-5, -3), (1, 0)), ((100, 100), (24, 40)), ((24, 2**31 - 1), (24, 40)), ((7, 13), (7, 13))],
    ids=["n_full-0", "negative", "past-both-buffers", "n_mid-huge", "in-range"],
)
def test_device_lengths_are_clamped_to_the_buffers(asked, clamped):
    """Lengths read on the device are clamped into [1, Nf] and [0, Nm]: the output is the attention over the clamped
    lengths, finite, and no program reads past the buffers (the poison past them would show as NaN)."""
    decoder, q, kf, vf, mid_k, mid_v, (k_full, v_full, groups) = _poisoned_decoder_inputs(24, 40)
    lengths = torch.tensor(asked, dtype=torch.int32, device=DEVICE)
    out = decoder(q, kf, vf, mid_k, mid_v, lengths)
    assert torch.isfinite(out).all()
    expected = reference(q, k_full, v_full, groups, torch.tensor(clamped, device=DEVICE))
    torch.testing.assert_close(out, expected, **TOL)
    assert not decoder.count.any()


def test_one_launch_per_call(monkeypatch):
    """The decoder's call is exactly one kernel launch (the merge included)."""
    launches = []
    kernel = leank_kernel.leank_layer_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    q, k, v, keep, k_full, v_full, groups = _decoder_inputs(1, 8, 4, 150, 64, [0, 16, 48, 64], 16, 40, seed=3)
    decoder = LeanKDecoder(HeadGroups.from_mask(keep), 1, 8, DTYPE, DEVICE, k_full.shape[2], groups[0].k.shape[2])
    monkeypatch.setattr(leank_kernel, "leank_layer_kernel", Counting())
    decoder(q, k_full, v_full, [g.k for g in groups], [g.v for g in groups], (k_full.shape[2], groups[0].k.shape[2]))
    assert len(launches) == 1


def test_eight_groups_in_one_launch_and_nine_refused():
    """Up to MAX_GROUPS distinct kept counts share the launch; more raise a ValueError naming the fix."""
    q, k, v = qkv(1, 8, 8, 100, 128, seed=37)
    keep = random_keep(8, 128, [16, 32, 48, 64, 80, 96, 112, 128], seed=9)
    k_full, v_full, groups = layout(k, v, keep, 8, 16)
    assert len(groups) == leank_decoder.MAX_GROUPS
    out = leank_decode(q, k_full, v_full, groups)
    torch.testing.assert_close(out, masked_sdpa(q, k, v, keep, 8, 16), **TOL)
    keep9 = torch.zeros(9, 256, dtype=torch.bool)
    for h in range(9):
        keep9[h, : 16 * (h + 1)] = True
    with pytest.raises(ValueError, match="at most 8: binarize with an alignment"):
        LeanKDecoder(HeadGroups.from_mask(keep9), 1, 9, DTYPE, DEVICE, 16, 16)


def test_leank_all_channels_kept_is_dense():
    q, k, v = qkv(2, 8, 4, 130, 64, seed=11)
    keep = torch.ones(4, 64, dtype=torch.bool, device=DEVICE)
    k_full, v_full, groups = layout(k, v, keep, 16, 32)
    assert [g.k.shape[3] for g in groups] == [64]
    torch.testing.assert_close(leank_decode(q, k_full, v_full, groups), sdpa_expanded(q, k, v), **TOL)


def test_leank_any_channel_and_head_order():
    """The kernel gathers q by each row's own channel list: reordering channels and rows changes nothing."""
    B, H, G, N, D = 1, 8, 4, 100, 64
    q, k, v = qkv(B, H, G, N, D, seed=13)
    keep = random_keep(G, D, [32, 32, 32, 16], seed=3)
    k_full, v_full, groups = layout(k, v, keep, 8, 24)
    expected = leank_decode(q, k_full, v_full, groups)
    shuffled = []
    for grp in groups:
        rows = torch.arange(grp.kv_heads.numel() - 1, -1, -1, device=DEVICE)  # reversed rows
        perm = torch.randperm(grp.channels.shape[1], generator=torch.Generator().manual_seed(0)).to(DEVICE)
        shuffled.append(
            MiddleGroup(
                grp.kv_heads[rows].contiguous(),
                grp.channels[rows][:, perm].contiguous(),
                grp.k[:, rows][..., perm].contiguous(),
                grp.v[:, rows].contiguous(),
            )
        )
    torch.testing.assert_close(leank_decode(q, k_full, v_full, shuffled[::-1]), expected, **TOL)


def test_leank_layout_shapes_and_values():
    B, G, N, D, sink, recent = 2, 4, 100, 64, 8, 24
    _, k, v = qkv(B, 4, G, N, D, seed=17)
    keep = random_keep(G, D, [0, 16, 48, 16], seed=5)
    k_full, v_full, groups = layout(k, v, keep, sink, recent)
    assert k_full.shape == v_full.shape == (B, G, sink + recent, D)
    torch.testing.assert_close(k_full, torch.cat([k[:, :, :sink], k[:, :, N - recent :]], dim=2), rtol=0, atol=0)
    assert [(g.kv_heads.tolist(), g.k.shape[3]) for g in groups] == [([1, 3], 16), ([2], 48)]
    for grp in groups:
        for row, head in enumerate(grp.kv_heads.tolist()):
            channels = torch.nonzero(keep[head]).flatten()
            assert torch.equal(grp.channels[row], channels)
            assert torch.equal(grp.k[:, row], k[:, head, sink : N - recent][..., channels])
            assert torch.equal(grp.v[:, row], v[:, head, sink : N - recent])


def test_leank_without_groups_attends_to_the_full_part_only():
    q, k_full, v_full = qkv(1, 8, 2, 40, 64, seed=19)
    torch.testing.assert_close(leank_decode(q, k_full, v_full, []), sdpa_expanded(q, k_full, v_full), **TOL)


# ----------------------------------------------------------------------------------------------
# Wrappers: errors that name the fix
# ----------------------------------------------------------------------------------------------
def _dense_inputs(**change):
    q, k, v = qkv(1, 8, 2, 10, 64, seed=23)
    return {"q": q, "k": k, "v": v, **change}


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": torch.zeros(8, 64)}, ValueError, r"expected q \[B, H, D\]"),
        ({"v": torch.zeros(1, 2, 11, 64)}, ValueError, "v must have k's shape"),
        ({"k": torch.zeros(2, 2, 10, 64), "v": torch.zeros(2, 2, 10, 64)}, ValueError, r"needs \[1, G, N, 64\]"),
        ({"k": torch.zeros(1, 3, 10, 64), "v": torch.zeros(1, 3, 10, 64)}, ValueError, "multiple of KV heads"),
        ({"k": torch.zeros(1, 2, 0, 64), "v": torch.zeros(1, 2, 0, 64)}, ValueError, "cache is empty"),
        (
            {"q": torch.zeros(1, 8, 96), "k": torch.zeros(1, 2, 10, 96), "v": torch.zeros(1, 2, 10, 96)},
            ValueError,
            "head_dim must be a power of two",
        ),
        ({"v": torch.zeros(1, 2, 10, 64, dtype=torch.float16)}, TypeError, r"cast them with \.to\(q\.dtype\)"),
        (
            {
                "q": torch.zeros(1, 8, 64, dtype=torch.int32),
                "k": torch.zeros(1, 2, 10, 64, dtype=torch.int32),
                "v": torch.zeros(1, 2, 10, 64, dtype=torch.int32),
            },
            TypeError,
            "use torch.bfloat16 or torch.float16",
        ),
        ({"v": torch.zeros(1, 2, 10, 64, device="meta")}, ValueError, r"one device.*\.to\(device\)"),
        ({"k": torch.zeros(1, 2, 64, 10).transpose(2, 3)}, ValueError, r"pass k\.contiguous\(\)"),
    ],
    ids=["q-2d", "v-shape", "batch", "gqa", "empty", "head-dim", "dtype-mix", "int", "device", "stride"],
)
def test_dense_wrapper_errors(change, error, match):
    inputs = _dense_inputs(**{name: t.to(DEVICE) if t.device.type != "meta" else t for name, t in change.items()})
    with pytest.raises(error, match=match):
        dense_decode(**inputs)


def test_num_splits_must_be_positive():
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        dense_decode(**_dense_inputs(), num_splits=0)


def test_no_cuda_and_no_interpreter_is_refused(monkeypatch):
    """The decision: CPU tensors need kernels defined by the interpreter; the message says how to get them."""
    cpu = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        RuntimeError, match="no CUDA and TRITON_INTERPRET is not set: .*set TRITON_INTERPRET=1 before"
    ) as e:
        check_runnable(cpu, interpret=False)
    assert "restart" not in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set, but after the kernels were defined
    with pytest.raises(RuntimeError, match="was not when leank_ref.kernels was imported"):
        check_runnable(cpu, interpret=False)
    check_runnable(cpu, interpret=True)  # the interpreter runs CPU tensors
    # The wrappers ask the same function, with what the module recorded at import.
    monkeypatch.setattr(launch, "INTERPRETED", False)
    q, k, v = (t.cpu() for t in qkv(1, 4, 2, 5, 64))
    with pytest.raises(RuntimeError, match="no CUDA and TRITON_INTERPRET is not set"):
        dense_decode(q, k, v)
    with pytest.raises(RuntimeError, match="no CUDA and TRITON_INTERPRET is not set"):
        leank_decode(q, k, v, [])


def test_interpreter_refuses_bfloat16():
    with pytest.raises(TypeError, match="use float32 or float16 on CPU"):
        check_runnable(torch.zeros(2, dtype=torch.bfloat16), interpret=True)


def _leank_inputs(counts=(16, 0), D=64):
    q, k, v = qkv(1, 4, 2, 40, D, seed=29)
    keep = random_keep(2, D, list(counts), seed=1)
    k_full, v_full, groups = layout(k, v, keep, 8, 8)
    return q, k_full, v_full, groups


def _group(**change) -> list[MiddleGroup]:
    grp = _leank_inputs()[3][0]
    return [MiddleGroup(**{**vars(grp), **change})]


@pytest.mark.parametrize(
    "groups, error, match",
    [
        (lambda: _group(kv_heads=torch.tensor([0], dtype=torch.int32)), TypeError, r"must be int64: use \.long\(\)"),
        (lambda: _group(channels=torch.arange(16)), ValueError, r"channels \[Gc, c\]"),
        (
            lambda: _group(channels=torch.arange(8)[None], k=torch.zeros(1, 1, 24, 8)),
            ValueError,
            "must be a multiple of 16",
        ),
        (
            lambda: _group(channels=torch.zeros(1, 0, dtype=torch.long), k=torch.zeros(1, 1, 24, 0)),
            ValueError,
            "leave those heads out of groups",
        ),
        (lambda: _group(k=torch.zeros(1, 1, 24, 32)), ValueError, r"expected \[1, 1, Nm, 16\]"),
        (lambda: _group(v=torch.zeros(1, 1, 23, 64)), ValueError, r"v has shape .* expected \[1, 1, 24, 64\]"),
        (lambda: _group(k=torch.zeros(1, 1, 16, 24).transpose(2, 3)), ValueError, r"groups\[0\]\.k\.contiguous\(\)"),
        (lambda: _group(kv_heads=torch.tensor([0, 5])[::2]), ValueError, r"kv_heads\.contiguous\(\)"),
        (lambda: _group(kv_heads=torch.tensor([2])), ValueError, r"outside 0\.\.1"),
        (lambda: _group() + _group(), ValueError, "repeat a KV head"),
        (lambda: _group(channels=torch.full((1, 16), 64)), ValueError, r"must lie in 0\.\.63"),
        (lambda: _group(channels=torch.zeros(1, 16, dtype=torch.long)), ValueError, "repeat a channel"),
        (
            lambda: _group(
                kv_heads=torch.tensor([0, 1, 0]),
                channels=torch.arange(16).repeat(3, 1),
                k=torch.zeros(1, 3, 24, 16),
                v=torch.zeros(1, 3, 24, 64),
            ),
            ValueError,
            "only G=2",
        ),
    ],
    ids=[
        "int32-heads",
        "channels-1d",
        "c-not-aligned",
        "c-zero",
        "k-width",
        "v-length",
        "k-stride",
        "heads-stride",
        "head-range",
        "head-twice",
        "channel-range",
        "channel-twice",
        "too-many-heads",
    ],
)
def test_leank_wrapper_errors(groups, error, match):
    q, k_full, v_full, _ = _leank_inputs()
    groups = [MiddleGroup(*(t.to(DEVICE) for t in vars(g).values())) for g in groups()]
    with pytest.raises(error, match=match):
        leank_decode(q, k_full, v_full, groups)


def test_leank_full_part_errors():
    q, k_full, v_full, groups = _leank_inputs()
    with pytest.raises(ValueError, match=r"full part is empty"):
        leank_decode(q, k_full[:, :, :0], v_full[:, :, :0], groups)
    with pytest.raises(ValueError, match="v_full must have k_full's shape"):
        leank_decode(q, k_full, v_full[:, :, :-1], groups)
    with pytest.raises(TypeError, match=r"cast them with \.to\(q\.dtype\)"):
        leank_decode(q, k_full, v_full, [MiddleGroup(g.kv_heads, g.channels, g.k.half(), g.v) for g in groups])
    with pytest.raises(ValueError, match=r"keep has shape \[2, 32\] but the cache needs \[2, 64\]"):
        layout(k_full, v_full, torch.ones(2, 32, dtype=torch.bool), 8, 8)


# ----------------------------------------------------------------------------------------------
# The GPU compiler (no GPU needed): the interpreter accepts code that Triton's compiler rejects
# ----------------------------------------------------------------------------------------------
def test_kernels_compile_for_h100_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "leank_ref.kernels.compile_check"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in run.stdout.splitlines() if "registers/thread" in line}
    assert set(lines) == {"dense partials", "merge", "LeanK layer, 3 groups"}, run.stdout
    for name in ("dense partials", "merge"):
        assert "spill stack 0 B" in lines[name], lines[name]
