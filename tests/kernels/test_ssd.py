"""Triton SSD (chunked scan and decode step) against the PyTorch reference in fp64."""
import pytest
import torch
from kernel_helpers import assert_close, grads, leaves, rel_err

from strata.kernels.ssd.function import ssd_chunked_triton
from strata.kernels.ssd.reference import ssd_chunked_ref, ssd_step_ref
from strata.kernels.ssd.step import ssd_step_triton

NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


def make_inputs(b, l, h, p, g, n, *, D="h", z=True, bias=True, softplus=True, init=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    dt = r(b, l, h, scale=0.5) if softplus else torch.rand(b, l, h, generator=gen) * 0.2 + 0.01
    return dict(
        x=r(b, l, h, p), dt=dt, A=-(torch.rand(h, generator=gen) * 2 + 0.2),
        B=r(b, l, g, n, scale=0.5), C=r(b, l, g, n, scale=0.5),
        D=None if D is None else (r(h) if D == "h" else r(h, p)),
        z=r(b, l, h, p) if z else None, dt_bias=r(h, scale=0.5) if bias else None,
        initial_states=r(b, h, p, n) if init else None,
    )


def run(fn, inputs, chunk_size, softplus, final, dtype, **kwargs):
    t = dict(zip(NAMES, leaves(*[inputs[k] for k in NAMES], dtype=dtype)))
    out = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
             dt_softplus=softplus, initial_states=t["initial_states"], return_final_states=final, **kwargs)
    ins = [t[k] for k in NAMES]
    return (out if final else (out,)), grads(out, ins)


CASES = [
    # (b, l, h, p, g, n, chunk, options)
    pytest.param(1, 1, 2, 32, 1, 16, 16, {}, id="len1"),
    pytest.param(2, 63, 4, 32, 2, 16, 32, dict(D="hp", bias=False, softplus=False), id="len63-groups2-Dhp"),
    pytest.param(1, 129, 2, 64, 1, 64, 64, dict(z=False, init=False), id="len129-p64-n64"),
    pytest.param(1, 100, 2, 32, 1, 32, 48, dict(D=None), id="chunk48-noD"),
    pytest.param(1, 1134, 2, 32, 1, 128, 256, dict(z=False), id="len1134-n128-chunk256"),
]


@pytest.mark.parametrize("b,l,h,p,g,n,chunk,opts", CASES)
def test_ssd_chunked_matches_reference(b, l, h, p, g, n, chunk, opts):
    softplus = opts.get("softplus", True)
    inputs = make_inputs(b, l, h, p, g, n, **opts)
    final = True
    (y, fs), gt = run(ssd_chunked_triton, inputs, chunk, softplus, final, torch.float32)
    (y_ref, fs_ref), gr = run(ssd_chunked_ref, inputs, chunk, softplus, final, torch.float64)
    assert y.dtype == torch.float32 and fs.dtype == torch.float32
    assert_close("y", y, y_ref, 1e-5)
    assert_close("final_states", fs, fs_ref, 1e-5)
    for name, a, r in zip(NAMES, gt, gr):
        if r is None:
            assert a is None, name
            continue
        # Parameter gradients (A, dt_bias, D) are sums over every position: looser.
        assert_close(f"d{name}", a, r, 1e-4 if name in ("A", "dt_bias", "D", "dt") else 2e-5)


DT_LIMIT = (0.5, 0.9)


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw"])
def test_ssd_chunked_clamps_dt_to_dt_limit_as_the_reference(softplus):
    """dt_limit clamps the prepared dt (some tokens below it, some above): forward, final state and
    every gradient, a clamped dt passing none."""
    inputs = make_inputs(2, 45, 4, 32, 2, 16, softplus=softplus)
    if not softplus:
        inputs["dt"] = inputs["dt"] * 6  # raw dt in [0.06, 1.3]: both ends of the limit bite
    prepared = inputs["dt"] + inputs["dt_bias"]
    prepared = torch.nn.functional.softplus(prepared) if softplus else prepared
    assert (prepared < DT_LIMIT[0]).float().mean() > 0.1 and (prepared > DT_LIMIT[1]).float().mean() > 0.1
    (y, fs), gt = run(ssd_chunked_triton, inputs, 16, softplus, True, torch.float32, dt_limit=DT_LIMIT)
    (y_ref, fs_ref), gr = run(ssd_chunked_ref, inputs, 16, softplus, True, torch.float64, dt_limit=DT_LIMIT)
    (y_free,), _ = run(ssd_chunked_ref, inputs, 16, softplus, False, torch.float64)
    assert rel_err(y_free, y_ref) > 1e-2  # the limit changes the result
    assert_close("y", y, y_ref, 1e-5)
    assert_close("final_states", fs, fs_ref, 1e-5)
    for name, a, r in zip(NAMES, gt, gr):
        if r is not None:
            assert_close(f"d{name}", a, r, 1e-4)
    clamped = (prepared < DT_LIMIT[0]) | (prepared > DT_LIMIT[1])
    assert (gt[NAMES.index("dt")][clamped] == 0).all() and (gr[NAMES.index("dt")][clamped] == 0).all()


def test_ssd_chunked_without_final_state():
    inputs = make_inputs(1, 40, 2, 32, 1, 16, z=False, init=False)
    (y,), gt = run(ssd_chunked_triton, inputs, 16, True, False, torch.float32)
    (y_ref,), gr = run(ssd_chunked_ref, inputs, 16, True, False, torch.float64)
    assert_close("y", y, y_ref, 1e-5)
    for name, a, r in zip(NAMES, gt, gr):
        if r is not None:
            assert_close(f"d{name}", a, r, 1e-4)


def test_ssd_sequence_chunking_with_states():
    """Two calls joined by the state (final -> initial) equal one call on the whole sequence."""
    inputs = make_inputs(1, 70, 2, 32, 1, 16, init=False)
    x, dt, A, B, C, D, z, bias = (inputs[k] for k in NAMES[:-1])
    full, fs_full = ssd_chunked_triton(x, dt, A, B, C, 32, D, z, bias, True, None, True)
    cut = 45
    y1, s1 = ssd_chunked_triton(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 32, D, z[:, :cut], bias, True,
                                None, True)
    y2, s2 = ssd_chunked_triton(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 32, D, z[:, cut:], bias, True,
                                s1, True)
    assert_close("y", torch.cat([y1, y2], 1), full, 1e-5)
    assert_close("final_states", s2, fs_full, 1e-5)


@pytest.mark.parametrize("b,h,p,g,n,opts", [
    pytest.param(2, 4, 32, 2, 16, dict(D="h"), id="groups2"),
    pytest.param(1, 2, 64, 1, 128, dict(D="hp", z=False, bias=False), id="p64-n128-Dhp"),
    pytest.param(3, 2, 20, 1, 24, dict(D=None), id="odd"),
])
def test_ssd_step_matches_reference(b, h, p, g, n, opts):
    i = make_inputs(b, 1, h, p, g, n, **opts)
    args = (i["initial_states"], i["x"][:, 0], i["dt"][:, 0], i["A"], i["B"][:, 0], i["C"][:, 0], i["D"],
            None if i["z"] is None else i["z"][:, 0], i["dt_bias"], True)
    y, s = ssd_step_triton(*args)
    y_ref, s_ref = ssd_step_ref(*[a.double() if torch.is_tensor(a) else a for a in args])
    assert_close("y", y, y_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)
    assert s.dtype == torch.float32 and not torch.equal(s, i["initial_states"])


def test_ssd_step_clamps_dt_to_dt_limit_as_the_reference():
    i = make_inputs(4, 1, 8, 16, 2, 16)
    args = (i["initial_states"], i["x"][:, 0], i["dt"][:, 0], i["A"], i["B"][:, 0], i["C"][:, 0], i["D"],
            i["z"][:, 0], i["dt_bias"], True)
    prepared = torch.nn.functional.softplus(i["dt"][:, 0] + i["dt_bias"])
    assert (prepared < DT_LIMIT[0]).any() and (prepared > DT_LIMIT[1]).any()
    y, s = ssd_step_triton(*args, dt_limit=DT_LIMIT)
    y_ref, s_ref = ssd_step_ref(*[a.double() if torch.is_tensor(a) else a for a in args], dt_limit=DT_LIMIT)
    y_free, _ = ssd_step_ref(*[a.double() if torch.is_tensor(a) else a for a in args])
    assert rel_err(y_free, y_ref) > 1e-2
    assert_close("y", y, y_ref, 1e-5)
    assert_close("state", s, s_ref, 1e-5)
