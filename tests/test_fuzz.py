"""Randomized differential test of every op, forward and backward, against float64 references,
on the CPU kernels and on the CUDA kernels emulated (CPU tensors throughout, so not on a GPU).

Seeded generators (reproducible: each case's parameters are in its assertion message) draw shapes
(1, odd, prime, just over a tile), strides (transposed (N, L, H, E) views, sliced last dims,
broadcast batch), dtypes, masks (bool / additive of any floating dtype, broadcast, with -inf and
fully masked rows), causality, GQA and dropout (the exact Philox mask, from
tx_kernels.reference.dropout_keep_mask). A second set injects NaN, Inf and huge values.

Accuracy rules (README, "Testing"):
- fp32/fp64: relative error (norm) vs the float64 reference under 1e-5 / 1e-12 forward and
  1e-4 / 1e-10 for gradients.
- fp16/bf16: max error vs the float64 reference at most 2x that of stock torch computing the same
  thing in the same precision, plus an absolute floor of a few units in the last place of the
  output's magnitude. For attention "stock torch" is F.scaled_dot_product_attention (torch's
  fused CPU kernel) in that dtype for the CPU kernels, and the composite in that dtype for the
  CUDA kernels (attention_refs.torch_sdpa says why).
- NaN/Inf: the forward's NaN and Inf pattern equals the float64 reference's; a gradient has NaN
  exactly when the reference's has.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import tx_kernels.functional as TF
import tx_kernels.reference as R
from conftest import ulp_floor
from cuda_backends import BE

# Every case on the CPU kernels and on the CUDA kernels emulated (the inputs are CPU tensors).
pytestmark = [pytest.mark.usefixtures("backend"), pytest.mark.backends("cpu", "emu")]

f64 = torch.float64
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CASES_PER_OP = 300
NONFINITE_CASES = 60


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    d = ref.norm().item()
    return (x - ref).norm().item() / (d if d > 0 else 1.0)


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _check(ours, ref, torch_same, dtype, what, fwd, floor=0.0, abs_scale=0.0):
    """floor / abs_scale: the smallest norm the relative error is taken against (fp32/fp64) and
    the magnitude whose ulps bound the absolute error (fp16/bf16): a gradient that is 0 in exact
    arithmetic holds rounding noise the size of the case's other gradients."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    low = ours.dtype if ours.dtype in LOW else (dtype if dtype in LOW else None)
    if low is not None:  # (a mask gradient of any dtype follows the inputs' precision)
        if torch_same is None:  # no torch counterpart: the reference rounded to the dtype
            torch_same = ref.to(low)
        limit = 2.0 * _max_err(torch_same, ref) + ulp_floor(ref, low) + \
            4 * torch.finfo(low).eps * abs_scale
        err = _max_err(ours, ref)
        assert err <= limit, f"{what}: max error {err:.3e} > 2x torch's {_max_err(torch_same, ref):.3e} + floor"
    else:
        prec = torch.float32 if torch.float32 in (ours.dtype, dtype) else f64  # fp32 inputs, fp64 mask
        tol = {torch.float32: (1e-5, 1e-4), f64: (1e-12, 1e-10)}[prec][0 if fwd else 1]
        d = max(ref.double().norm().item(), floor, 1e-300)
        err = (ours.double() - ref.double()).norm().item() / d
        assert err < tol, f"{what}: relative error {err:.3e} >= {tol}"


def _strided(t, rng, kind=None):
    """t's values in one of a few memory layouts (the values, hence the reference, are unchanged)."""
    kind = kind or rng.choice(["contiguous", "transposed", "padded_last", "noncontig_batch"])
    if kind == "transposed" and t.dim() == 4:  # a (N, L, H, E) tensor viewed as (N, H, L, E)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "padded_last":  # the last dim is a slice of a wider one: rows have gaps
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if kind == "noncontig_batch" and t.dim() >= 2:
        big = torch.empty(t.shape[0] * 2, *t.shape[1:], dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t.contiguous()


def _sizes(rng, choices, small):
    return rng.choice(choices) if rng.random() < 0.3 else rng.randint(1, small)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def _attention_case(rng, dtype=None):
    c = dict(
        dtype=dtype or rng.choice(DTYPES),
        N=rng.randint(1, 2), Hkv=rng.randint(1, 2), group=rng.choice([1, 1, 2, 3]),
        L=_sizes(rng, [1, 17, 64, 65, 129], 24), S=_sizes(rng, [1, 31, 256, 257], 40),
        E=rng.choice([1, 2, 3, 5, 8, 16, 33, 64]),
        causal=rng.random() < 0.3, dropout=rng.choice([0.0, 0.0, 0.0, 0.2]),
        mask=rng.choice([None, None, "bool", "bool_keys", "add", "add_heads", "add_other_dtype"]),
        scale=rng.choice([None, None, 0.3, 1.7]),
        layout=[rng.choice(["contiguous", "transposed", "padded_last", "noncontig_batch"]) for _ in range(3)],
        seed=rng.randrange(2**62), offset=rng.randrange(2**40),
    )
    c["Ev"] = c["E"] if rng.random() < 0.6 else rng.choice([1, 4, 7, 16])
    return c


def _attention_inputs(c, gen):
    N, Hkv, L, S, E, Ev = c["N"], c["Hkv"], c["L"], c["S"], c["E"], c["Ev"]
    H = Hkv * c["group"]
    q = torch.randn(N, H, L, E, generator=gen, dtype=f64)
    k = torch.randn(N, Hkv, S, E, generator=gen, dtype=f64)
    v = torch.randn(N, Hkv, S, Ev, generator=gen, dtype=f64)
    mask = None
    kind = c["mask"]
    if kind == "bool":
        mask = torch.rand(L, S, generator=gen) > 0.3
        mask[L // 2] = False  # a fully masked row
    elif kind == "bool_keys":
        mask = torch.rand(N, 1, 1, S, generator=gen) > 0.4
    elif kind in ("add", "add_heads", "add_other_dtype"):
        shape = (L, S) if kind != "add_heads" else (1, H, L, S)
        mask = torch.randn(*shape, generator=gen, dtype=f64)
        mask[..., rng_index(gen, L), :] = float("-inf")  # a fully masked row
        mask = mask.masked_fill(torch.rand(*shape, generator=gen) < 0.1, float("-inf"))
    return q, k, v, mask


def rng_index(gen, n):
    return int(torch.randint(0, n, (1,), generator=gen))


def _run_attention(c, q, k, v, mask, dtype, mask_dtype, with_grad=True):
    """tx_kernels attention on (q, k, v, mask) cast to dtype, laid out per c; returns out, grads."""
    tensors = [_strided(t.to(dtype), random.Random(0), lay) for t, lay in zip((q, k, v), c["layout"])]
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(mask_dtype))
    leaves = [t.detach().requires_grad_(with_grad) for t in tensors]
    mask_leaf = m.detach().requires_grad_(with_grad) if m is not None and m.is_floating_point() else m
    scale = c["scale"] if c["scale"] is not None else 1.0 / math.sqrt(c["E"])
    rng = torch.tensor([c["seed"], c["offset"]], dtype=torch.int64)
    out, _ = BE.ops.attention_fwd(*leaves, mask_leaf, float(scale), c["causal"], c["dropout"],
                               rng if c["dropout"] > 0 else None)
    return out, leaves, mask_leaf


def _attention_reference(c, q, k, v, mask, dtype, mask_dtype):
    """float64 reference of the same inputs (rounded to dtype first, as the kernel sees them)."""
    N, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = None
    if c["dropout"] > 0:
        keep = R.dropout_keep_mask(c["seed"], c["offset"], N * H * L * S, c["dropout"]).reshape(N, H, L, S)
    qs, ks, vs = (t.to(dtype).double().requires_grad_() for t in (q, k, v))
    m = None
    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask.to(mask_dtype).double().requires_grad_()
    out = R.attention(qs, ks, vs, attn_mask=m, is_causal=c["causal"], scale=c["scale"],
                      dropout_mask=keep, dropout_p=c["dropout"])
    return out, [qs, ks, vs], m


def _torch_same_precision(c, q, k, v, mask, dtype, mask_dtype):
    """Stock torch in dtype: F.scaled_dot_product_attention (its fused CPU kernel), or, with
    dropout (torch cannot take our mask), torch's composite in dtype. Fully masked rows are 0 in
    both (torch's SDPA gives 0 for them too)."""
    qs, ks, vs = (t.to(dtype).requires_grad_() for t in (q, k, v))
    m = None
    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask.to(mask_dtype).requires_grad_()
    if c["dropout"] > 0 or BE.name != "cpu":
        # The composite in dtype also for the CUDA kernels: on CPU tensors torch's SDPA computes
        # partly in fp32 (attention_refs.torch_sdpa), no baseline for a kernel that does not.
        N, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        keep = None
        if c["dropout"] > 0:
            keep = R.dropout_keep_mask(c["seed"], c["offset"], N * H * L * S, c["dropout"]).reshape(N, H, L, S)
        out = R.attention(qs, ks, vs, attn_mask=m, is_causal=c["causal"], scale=c["scale"],
                          dropout_mask=keep, dropout_p=c["dropout"])
        return out, [qs, ks, vs], m
    sdpa_mask, causal = m, c["causal"]
    if causal and m is not None:  # torch takes one or the other: fold causality into the mask
        tril = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        sdpa_mask = (m & tril) if m.dtype == torch.bool else m.masked_fill(~tril, float("-inf"))
        causal = False
    if sdpa_mask is not None and sdpa_mask.is_floating_point():
        sdpa_mask = sdpa_mask.to(dtype)  # torch requires the query's dtype
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=sdpa_mask, is_causal=causal,
                                         scale=c["scale"], enable_gqa=c["group"] > 1)
    return out, [qs, ks, vs], m


def _check_attention_case(i, c):
    gen = torch.Generator().manual_seed(c["seed"] % 2**31)
    q, k, v, mask = _attention_inputs(c, gen)
    dtype = c["dtype"]
    mask_dtype = dtype if c["mask"] != "add_other_dtype" else random.Random(i).choice(DTYPES)
    what = f"attention case {i} {c} mask_dtype={mask_dtype}"
    out, leaves, mask_leaf = _run_attention(c, q, k, v, mask, dtype, mask_dtype)
    ref, ref_leaves, ref_mask = _attention_reference(c, q, k, v, mask, dtype, mask_dtype)
    same = _torch_same_precision(c, q, k, v, mask, dtype, mask_dtype) if dtype in LOW else None
    _check(out, ref, same[0] if same else None, dtype, what + " out", fwd=True)
    g = torch.randn(ref.shape, generator=gen, dtype=f64)
    wanted = leaves + ([mask_leaf] if mask_leaf is not None and mask_leaf.requires_grad else [])
    got = torch.autograd.grad(out, wanted, g.to(dtype))
    ref_wanted = ref_leaves + ([ref_mask] if ref_mask is not None and ref_mask.requires_grad else [])
    want = torch.autograd.grad(ref, ref_wanted, g)
    same_grads = [None] * len(want)
    if dtype in LOW:
        s_wanted = same[1] + ([same[2]] if same[2] is not None and same[2].is_floating_point() else [])
        s_wanted = [t for t in s_wanted if t.requires_grad]
        if len(s_wanted) == len(want):
            same_grads = torch.autograd.grad(same[0], s_wanted, g.to(same[0].dtype))
    floor = 1e-2 * max(w.norm().item() for w in want)
    abs_scale = max(w.abs().max().item() for w in want if w.numel())
    for name, a, b, s in zip(("dq", "dk", "dv", "dmask"), got, want, same_grads):
        if s is not None and s.dtype != a.dtype:
            s = None  # an fp32 mask's gradient under bf16 inputs: held to the rounded reference
        _check(a, b, s, dtype, f"{what} {name}", fwd=False, floor=floor, abs_scale=abs_scale)


def _cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def test_fuzz_attention():
    for i, c in enumerate(_cases(_attention_case, CASES_PER_OP, 1101)):
        _check_attention_case(i, c)


# ----------------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm
# ----------------------------------------------------------------------------------------------
def _ln_case(rng):
    ndim = rng.choice([1, 1, 1, 2])
    norm = [_sizes(rng, [1, 2, 7, 31, 64, 129, 768, 1000], 40) for _ in range(ndim)]
    lead = [rng.randint(1, 6) for _ in range(rng.choice([1, 2]))]
    return dict(dtype=rng.choice(DTYPES), lead=lead, norm=norm, weight=rng.random() < 0.7,
                bias=rng.random() < 0.7, eps=rng.choice([1e-5, 1e-6, 1e-3]),
                fused=rng.choice([None, "pre", "post"]), layout=rng.choice(
                    ["contiguous", "padded_last", "noncontig_batch"]),
                shift=rng.choice([0.0, 0.0, 5.0, 300.0]), seed=rng.randrange(2**31))


def _check_ln_case(i, c):
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, shape, norm = c["dtype"], c["lead"] + c["norm"], tuple(c["norm"])
    x = torch.randn(shape, generator=gen, dtype=f64) + c["shift"]
    r = torch.randn(shape, generator=gen, dtype=f64)
    w = torch.randn(norm, generator=gen, dtype=f64) if c["weight"] else None
    b = torch.randn(norm, generator=gen, dtype=f64) if c["bias"] else None
    g = torch.randn(shape, generator=gen, dtype=f64)
    what = f"layer_norm case {i} {c}"
    lp = random.Random(i)

    def run(dt, impl):
        xs = _strided(x.to(dt), lp, c["layout"]).requires_grad_()
        rs = _strided(r.to(dt), lp, c["layout"]).requires_grad_()
        ws = w.to(dt).requires_grad_() if w is not None else None
        bs = b.to(dt).requires_grad_() if b is not None else None
        if impl == "ours":
            if c["fused"] is None:
                out = TF.layer_norm(xs, norm, ws, bs, c["eps"])
            elif c["fused"] == "pre":
                out, s = TF.add_layer_norm(xs, rs, norm, ws, bs, c["eps"])
                out = out + 0.5 * s  # a residual stream that also carries gradient
            else:
                out = TF.add_layer_norm(xs, rs, norm, ws, bs, c["eps"], return_residual=False)
        else:
            # torch in dt; for the fused forms, the sum rounded to dt as `x + r` would be.
            s = xs if c["fused"] is None else xs + rs
            if impl == "ref":
                out = R.layer_norm(s, ws, bs, c["eps"], len(norm))
            else:
                out = F.layer_norm(s, norm, ws, bs, c["eps"])
            if c["fused"] == "pre":
                out = out + 0.5 * s
        leaves = [t for t in (xs, rs if c["fused"] else None, ws, bs) if t is not None]
        return out, torch.autograd.grad(out, leaves, g.to(out.dtype))

    ours, ours_g = run(dtype, "ours")
    # float64 reference: x and r rounded to dtype first; the sum itself is rounded as the kernel
    # (and `x + r` in dtype) does, so it is formed in dtype, then widened.
    xd, rd = x.to(dtype).double(), r.to(dtype).double()
    ref_x = xd if c["fused"] is None else (x.to(dtype) + r.to(dtype)).double()
    xs = xd.clone().requires_grad_()
    rs = rd.clone().requires_grad_()
    ws = w.to(dtype).double().requires_grad_() if w is not None else None
    bs = b.to(dtype).double().requires_grad_() if b is not None else None
    if c["fused"] is None or dtype == f64:
        s = xs if c["fused"] is None else xs + rs
    else:  # the sum rounded to dtype as a value, with gradient 1 to both inputs
        s = xs + rs + (ref_x - xd - rd)
    ref = R.layer_norm(s, ws, bs, c["eps"], len(norm))
    if c["fused"] == "pre":
        ref = ref + 0.5 * s
    leaves = [t for t in (xs, rs if c["fused"] else None, ws, bs) if t is not None]
    ref_g = torch.autograd.grad(ref, leaves, g)
    same, same_g = run(dtype, "torch") if dtype in LOW else (None, [None] * len(ref_g))
    _check(ours, ref, same, dtype, what + " out", fwd=True)
    floor = 1e-2 * max(w.norm().item() for w in ref_g)
    abs_scale = max(w.abs().max().item() for w in ref_g if w.numel())
    for n, (a, bb, sm) in enumerate(zip(ours_g, ref_g, same_g)):
        _check(a, bb, sm, dtype, f"{what} grad {n}", fwd=False, floor=floor, abs_scale=abs_scale)


def _kernels_take(dtype):
    """The CUDA LayerNorm and bias + activation kernels refuse fp64 with a clear error
    (test_bad_inputs.py): their fp64 cases run on the CPU kernels only. Called after a case has
    drawn all its random values, so every backend sees the same cases."""
    return dtype != f64 or BE.name == "cpu"


def test_fuzz_layer_norm():
    for i, c in enumerate(_cases(_ln_case, CASES_PER_OP, 2202)):
        if _kernels_take(c["dtype"]):
            _check_ln_case(i, c)


# ----------------------------------------------------------------------------------------------
# Bias + activation (+ dropout), feed-forward
# ----------------------------------------------------------------------------------------------
def _act_case(rng):
    return dict(dtype=rng.choice(DTYPES), act=rng.choice(["relu", "gelu", "gelu_tanh"]),
                lead=[rng.randint(1, 5) for _ in range(rng.choice([0, 1, 2]))],
                cols=_sizes(rng, [1, 7, 31, 768, 2049, 2053], 70), bias=rng.random() < 0.8,
                dropout=rng.choice([0.0, 0.0, 0.1, 0.5]), layout=rng.choice(
                    ["contiguous", "padded_last", "noncontig_batch"]),
                scale=rng.choice([1.0, 3.0]), seed=rng.randrange(2**62), offset=rng.randrange(2**40))


def _check_act_case(i, c):
    gen = torch.Generator().manual_seed(c["seed"] % 2**31)
    dtype, shape = c["dtype"], c["lead"] + [c["cols"]]
    x = torch.randn(shape, generator=gen, dtype=f64) * c["scale"]
    b = torch.randn(c["cols"], generator=gen, dtype=f64) if c["bias"] else None
    g = torch.randn(shape, generator=gen, dtype=f64)
    numel = x.numel()
    keep = R.dropout_keep_mask(c["seed"], c["offset"], numel, c["dropout"]).reshape(shape)
    rng_t = torch.tensor([c["seed"], c["offset"]], dtype=torch.int64)
    what = f"bias_act case {i} {c}"

    def run(dt, impl):
        xs = _strided(x.to(dt), random.Random(i), c["layout"]).requires_grad_()
        bs = b.to(dt).requires_grad_() if b is not None else None
        if impl == "ours":
            out = BE.ops.bias_act_fwd(xs, bs, c["act"], c["dropout"], rng_t if c["dropout"] > 0 else None)
        else:
            out = R.bias_act(xs, bs, c["act"]) if impl == "ref" else _torch_act(xs, bs, c["act"])
            if c["dropout"] > 0:
                out = out * keep.to(out.dtype) / (1 - c["dropout"])
        leaves = [t for t in (xs, bs) if t is not None]
        return out, torch.autograd.grad(out, leaves, g.to(out.dtype))

    ours, ours_g = run(dtype, "ours")
    xd = x.to(dtype).double().requires_grad_()
    bd = b.to(dtype).double().requires_grad_() if b is not None else None
    ref = R.bias_act(xd, bd, c["act"])
    if c["dropout"] > 0:
        ref = ref * keep.double() / (1 - c["dropout"])
    ref_g = torch.autograd.grad(ref, [t for t in (xd, bd) if t is not None], g)
    same, same_g = run(dtype, "torch") if dtype in LOW else (None, [None] * len(ref_g))
    _check(ours, ref, same, dtype, what + " out", fwd=True)
    floor = 1e-2 * max(w.norm().item() for w in ref_g)
    abs_scale = max(w.abs().max().item() for w in ref_g if w.numel())
    for n, (a, bb, sm) in enumerate(zip(ours_g, ref_g, same_g)):
        _check(a, bb, sm, dtype, f"{what} grad {n}", fwd=False, floor=floor, abs_scale=abs_scale)


def _torch_act(x, b, act):
    y = x + b if b is not None else x
    return {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](y)


def test_fuzz_bias_act():
    for i, c in enumerate(_cases(_act_case, CASES_PER_OP, 3303)):
        if _kernels_take(c["dtype"]):
            _check_act_case(i, c)


def test_fuzz_feed_forward():
    rng = random.Random(4404)
    for i in range(40):
        dtype = rng.choice((torch.float32, f64))
        d_in, d_h, d_out = rng.randint(1, 40), rng.randint(1, 70), rng.randint(1, 30)
        act = rng.choice(["relu", "gelu", "gelu_tanh"])
        gen = torch.Generator().manual_seed(i)
        t = [torch.randn(*s, generator=gen, dtype=f64) for s in
             ((rng.randint(1, 5), d_in), (d_h, d_in), (d_h,), (d_out, d_h), (d_out,))]
        if not _kernels_take(dtype):
            continue
        ours_in = [a.to(dtype).requires_grad_() for a in t]
        ref_in = [a.to(dtype).double().requires_grad_() for a in t]
        ours = TF.feed_forward(*ours_in, activation=act)
        ref = R.feed_forward(*ref_in, activation=act)
        g = torch.randn(ref.shape, generator=gen, dtype=f64)
        what = f"feed_forward case {i} {dtype} {act} {d_in, d_h, d_out}"
        _check(ours, ref, None, dtype, what, fwd=True)
        for n, (a, b) in enumerate(zip(torch.autograd.grad(ours, ours_in, g.to(dtype)),
                                       torch.autograd.grad(ref, ref_in, g))):
            _check(a, b, None, dtype, f"{what} grad {n}", fwd=False)


# ----------------------------------------------------------------------------------------------
# NaN, Inf and huge values, every op
# ----------------------------------------------------------------------------------------------
POISONS = (float("nan"), float("inf"), float("-inf"))


def _poison(t, rng, gen, count=None):
    t = t.clone()
    flat = t.view(-1)
    for _ in range(count or rng.randint(1, 3)):
        flat[rng_index(gen, flat.numel())] = rng.choice(POISONS)
    return t


def _check_nan_contract(ours, ref, what, ours_grads=(), ref_grads=()):
    assert torch.equal(ours.isnan(), ref.isnan()), (
        f"{what}: NaN at {ours.isnan().sum().item()} places, reference at {ref.isnan().sum().item()}")
    fin = ~ref.isnan()
    assert torch.equal(ours[fin].isinf(), ref[fin].isinf()), f"{what}: Inf pattern differs"
    # Gradients: NaN exactly when the reference has NaN. Where within the tensor is not compared:
    # it depends on whether a BLAS skips zeros (0 * NaN) in torch's own matmuls.
    for n, (a, b) in enumerate(zip(ours_grads, ref_grads)):
        assert a.isnan().any() == b.isnan().any(), (
            f"{what} grad {n}: NaN in ours {a.isnan().any().item()}, in the reference {b.isnan().any().item()}")


def test_fuzz_attention_nonfinite():
    rng = random.Random(5505)
    for i in range(NONFINITE_CASES):
        c = _attention_case(rng, dtype=rng.choice((torch.float32, f64)))
        c["dropout"] = 0.0  # the reference's dropout of a NaN probability is NaN either way
        gen = torch.Generator().manual_seed(c["seed"] % 2**31)
        q, k, v, mask = _attention_inputs(c, gen)
        target = rng.choice(["q", "k", "mask", "scale", "huge"])
        if target == "q":
            q = _poison(q, rng, gen)
        elif target == "k":
            k = _poison(k, rng, gen)
        elif target == "mask" and mask is not None and mask.is_floating_point():
            mask = _poison(mask, rng, gen)
        elif target == "scale":
            c["scale"] = rng.choice(POISONS)
        else:  # huge but finite scores: the online softmax must not overflow
            q = q * 1e3
            k = k * 1e3
        what = f"attention nonfinite case {i} target={target} {c}"
        dtype = c["dtype"]
        out, leaves, mask_leaf = _run_attention(c, q, k, v, mask, dtype, dtype)
        ref, ref_leaves, _ = _attention_reference(c, q, k, v, mask, dtype, dtype)
        gout = torch.randn(ref.shape, generator=gen, dtype=f64)
        got = torch.autograd.grad(out, leaves, gout.to(dtype))
        want = torch.autograd.grad(ref, ref_leaves, gout)
        _check_nan_contract(out, ref, what, got, want)
        if target == "huge":
            _check(out, ref, None, dtype, what, fwd=True)


def test_fuzz_layer_norm_nonfinite():
    rng = random.Random(6606)
    for i in range(NONFINITE_CASES):
        dtype = rng.choice((torch.float32, f64))
        rows, cols = rng.randint(1, 6), rng.choice([1, 5, 64, 129])
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(rows, cols, generator=gen, dtype=f64)
        w = torch.randn(cols, generator=gen, dtype=f64)
        target = rng.choice(["x", "w", "huge"])
        if target == "x":
            x = _poison(x, rng, gen)
        elif target == "w":
            w = _poison(w, rng, gen)
        else:
            x = x * (1e15 if dtype == torch.float32 else 1e150)
        if not _kernels_take(dtype):
            continue
        xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        out = TF.layer_norm(xs, (cols,), ws, None)
        xr, wr = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
        ref = R.layer_norm(xr, wr, None)
        if rows * cols and cols == 1:
            pass  # a single column normalizes to 0 (x - mean) whatever its magnitude
        g = torch.randn(rows, cols, generator=gen, dtype=f64)
        got = torch.autograd.grad(out, (xs, ws), g.to(dtype))
        want = torch.autograd.grad(ref, (xr, wr), g)
        what = f"layer_norm nonfinite case {i} {dtype} target={target} {rows}x{cols}"
        _check_nan_contract(out, ref, what, got, want)
        if target == "huge":
            _check(out, ref, None, dtype, what, fwd=True)


def test_fuzz_bias_act_nonfinite():
    rng = random.Random(7707)
    for i in range(NONFINITE_CASES):
        dtype = rng.choice((torch.float32, f64))
        act = rng.choice(["relu", "gelu", "gelu_tanh"])
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(rng.randint(1, 4), rng.choice([3, 40]), generator=gen, dtype=f64)
        b = torch.randn(x.shape[-1], generator=gen, dtype=f64)
        target = rng.choice(["x", "b", "huge"])
        if target == "x":
            x = _poison(x, rng, gen, count=4)
        elif target == "b":
            b = _poison(b, rng, gen)
        else:
            x = x * (1e30 if dtype == torch.float32 else 1e300)
        if not _kernels_take(dtype):
            continue
        xs, bs = x.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        out = TF.bias_act(xs, bs, act)
        xr, br = x.to(dtype).double().requires_grad_(), b.to(dtype).double().requires_grad_()
        ref = _torch_act(xr, br, act)  # torch's own activations in float64
        g = torch.randn(x.shape, generator=gen, dtype=f64)
        got = torch.autograd.grad(out, (xs, bs), g.to(dtype))
        want = torch.autograd.grad(ref, (xr, br), g)
        what = f"bias_act nonfinite case {i} {dtype} {act} target={target}"
        if target == "huge":
            # torch's composite overflows inside (x^3, inf * 0) and returns NaN gradients for
            # huge finite inputs; the true derivatives are 1 (x > 0) and 0 (x < 0).
            _check_nan_contract(out, ref.to(dtype), what)
            v = (xs + bs).detach()
            for n, a in enumerate(got):
                assert torch.isfinite(a).all(), f"{what} grad {n}: not finite"
            expected = g.to(dtype) * (v > 0).to(dtype)
            assert torch.allclose(got[0], expected, rtol=1e-6, atol=1e-6), what
            continue
        _check_nan_contract(out, ref.to(dtype), what, got, want)
