"""Kernel benchmarks on one GPU: each Triton op against its PyTorch reference and against
torch.compile of that reference, with bf16 correctness against an fp32 reference.

    python bench/kernels.py                      # every op, the shapes of the 1.3B hybrid
    python bench/kernels.py --ops ssd,norm --no-compile
    python bench/kernels.py --sweep              # also try SSD block-size variants first
    python bench/kernels.py --ops ssd,norm,ce --no-compile --json out.json   # + the peers, as bench/gpu_suite.py

Beside Strata's kernels, the same ops of others at the same shapes (../shared/gpu/peers.md; off
with --no-peers): mamba_ssm's Triton SSD (mamba_chunk_scan_combined) and gated RMSNorm
(rmsnorm_fn), fla's chunk_simple_gla as an SSD (per head: q = C, k = B, v = x dt, g = A dt, the
dt softplus, the B/C expansion to heads and the D skip in PyTorch, inside the timing), and
Liger's fused linear cross-entropy and RMSNorm. A peer that is not installed is a row saying so.
They run after Strata's ops, in this process; --warm-peers only calls each once (filling
Triton's compile cache, e.g. in a process beside other work) and exits without a table.

Prints one table: median time (triton.testing.do_bench), achieved GB/s over the op's
minimum bytes (each input read once, each output written once) and TFLOP/s, both as a
share of the peaks given by --hbm-tbs / --peak-tflops (H100 SXM as measured here:
about 3.0 TB/s and 800 TFLOP/s bf16), speed-up over the reference, and the largest
relative error (norm of the difference over norm of the reference) of the bf16 Triton
output and gradients against the reference run in fp32 on the same inputs. For the
fused linear cross-entropy it also prints the peak memory of the fused and naive
versions beyond their inputs. Needs CUDA; records nothing itself: copy the table
into docs/BENCHMARKS.md with the date, machine and command.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from strata.kernels.blockdiag.reference import blockdiag_matmul_ref  # noqa: E402
from strata.kernels.conv.reference import causal_conv1d_ref  # noqa: E402
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref  # noqa: E402
from strata.kernels.norm.reference import rmsnorm_ref  # noqa: E402
from strata.kernels.ssd.reference import ssd_chunked_ref  # noqa: E402

ROWS: list[dict] = []


def bench(fn, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def rel(got, want):
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())


def add_row(op, mode, impl, ms, nbytes, flops, ref_ms=None, err=None, note=""):
    ROWS.append(dict(op=op, mode=mode, impl=impl, ms=ms, gbs=nbytes / ms / 1e6 if nbytes else None,
                     tflops=flops / ms / 1e9 if flops else None, speedup=(ref_ms / ms) if ref_ms else None,
                     err=err, note=note))


def run_variants(op, mode, impls, nbytes, flops, err=None, grad_to_none=None):
    """impls: [(name, fn)] with the reference first; a failing variant is reported, not fatal."""
    ref_ms = None
    for name, fn in impls:
        try:
            ms = bench(fn, grad_to_none)
        except Exception as e:  # noqa: BLE001 (a compile failure must not end the run)
            add_row(op, mode, name, float("nan"), 0, 0, note=f"failed: {type(e).__name__}: {str(e)[:60]}")
            continue
        if name == "reference":
            ref_ms = ms
        add_row(op, mode, name, ms, nbytes, flops, ref_ms if name != "reference" else None,
                err if name == "triton" else None)
        torch.cuda.synchronize()


def fwd_bwd(f, inputs, grad_out_like=None):
    """A closure running forward and backward of f(*inputs) with a fixed output gradient."""
    state = {}

    def step():
        out = f(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if "g" not in state:
            state["g"] = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, state["g"])
    return step


def sweep_knob(label, module, name, values, step):
    """Time `step` for each value of module.name; keep the fastest."""
    results = []
    for v in values:
        setattr(module, name, v)
        try:
            results.append((bench(step), v))
        except Exception as e:  # noqa: BLE001
            print(f"  {label} {name}={v}: failed ({type(e).__name__}: {str(e)[:80]})")
    best = min(results, key=lambda r: r[0])
    setattr(module, name, best[1])
    print(f"  sweep {label} {name}: " + ", ".join(f"{v}: {ms:.3f}" for ms, v in results) + f" -> {best[1]}",
          flush=True)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- SSD

def ssd_case(args):
    b, l, h, p, g, n, L = args.batch, args.seqlen, args.nheads, args.headdim, 1, args.dstate, args.chunk
    dev, dt_ = "cuda", torch.bfloat16
    x = torch.randn(b, l, h, p, device=dev, dtype=dt_)
    dt = (torch.randn(b, l, h, device=dev) * 0.5 - 1).to(dt_)
    A = -torch.exp(torch.rand(h, device=dev) * 2)
    B = (torch.randn(b, l, g, n, device=dev) * 0.3).to(dt_)
    C = (torch.randn(b, l, g, n, device=dev) * 0.3).to(dt_)
    D = torch.randn(h, device=dev)
    dt_bias = torch.randn(h, device=dev) * 0.5
    return (x, dt, A, B, C, D, dt_bias), (b, l, h, p, g, n, L)


def ssd_cost(dims):
    b, l, h, p, g, n, L = dims
    e = 2  # bf16 bytes
    fwd_bytes = e * (2 * b * l * h * p + b * l * h + 2 * b * l * g * n)
    bwd_bytes = e * (4 * b * l * h * p + 2 * b * l * h + 4 * b * l * g * n)
    fwd_flops = b * l * (g * L * n + h * L * p + 4 * h * p * n)
    bwd_flops = b * l * (2 * g * L * n + 2 * h * L * p + 8 * h * p * n)
    return fwd_bytes, bwd_bytes, fwd_flops, bwd_flops


def bench_ssd(args):
    from strata.kernels.ssd.function import ssd_chunked_triton
    inputs, dims = ssd_case(args)
    L = dims[-1]
    x, dt, A, B, C, D, dt_bias = inputs

    def call(fn):
        return lambda x, dt, A, B, C, D, dt_bias: fn(x, dt, A, B, C, L, D=D, dt_bias=dt_bias, dt_softplus=True)

    # bf16 correctness: Triton on bf16 inputs against the reference in fp32 on the same values.
    tri_in = [leaf(t) for t in inputs]
    ref_in = [leaf(t, torch.float32) for t in inputs]
    y = call(ssd_chunked_triton)(*tri_in)
    y_ref = call(ssd_chunked_ref)(*ref_in)
    gy = torch.randn_like(y_ref)
    gt = torch.autograd.grad(y, tri_in, gy.to(y.dtype))
    gr = torch.autograd.grad(y_ref, ref_in, gy)
    errs = {"y": rel(y, y_ref), **{f"d{nm}": rel(a, r) for nm, a, r in zip("x dt A B C D dt_bias".split(), gt, gr)}}
    print("ssd bf16 errors:", " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    del y_ref, gr, ref_in
    torch.cuda.empty_cache()

    fb, bb, ff, bf = ssd_cost(dims)
    fwd_in = [t.detach() for t in inputs]
    impls = [("reference", lambda: call(ssd_chunked_ref)(*fwd_in)),
             ("triton", lambda: call(ssd_chunked_triton)(*fwd_in))]
    if args.compile:
        cref = compiled(call(ssd_chunked_ref))
        impls.insert(1, ("compiled ref", lambda: cref(*fwd_in)))
    with torch.no_grad():
        run_variants("ssd", "fwd", impls, fb, ff, errs["y"])
    tin = [leaf(t) for t in inputs]
    impls = [("reference", fwd_bwd(call(ssd_chunked_ref), tin)), ("triton", fwd_bwd(call(ssd_chunked_triton), tin))]
    if args.compile:
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants("ssd", "fwd+bwd", impls, fb + bb, ff + bf, max(errs.values()), grad_to_none=tin)


def ssd_breakdown(args, sweep):
    """Time each SSD launch alone; with sweep, try block-size variants and keep the fastest."""
    from strata.kernels.ssd import config
    from strata.kernels.ssd.cumsum import chunk_cumsum_fwd
    from strata.kernels.ssd.scan import bmm_fwd, scan_fwd
    from strata.kernels.ssd.scan_bwd import dbc_bwd, dcb_bwd, dx_bwd
    from strata.kernels.ssd.state import state_bwd, state_fwd
    (x, dt, A, B, C, D, dt_bias), dims = ssd_case(args)
    L = dims[-1]
    dt_proc, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, True, L)
    states, _ = state_fwd(x, B, dt_proc, dA_cs, None)
    CB = bmm_fwd(C, B, L)
    dy = torch.randn_like(x)
    dS, _, _ = state_bwd(dy, C, dA_cs, states, None, False)
    dCB, _ = dcb_bwd(x, dy, CB, dt_proc, dA_cs, 1)
    launches = {
        "cumsum": (None, lambda: chunk_cumsum_fwd(dt, A, dt_bias, True, L)),
        "state_fwd": ("state_fwd", lambda: state_fwd(x, B, dt_proc, dA_cs, None)),
        "bmm": ("bmm", lambda: bmm_fwd(C, B, L)),
        "scan_fwd": ("scan_fwd", lambda: scan_fwd(x, C, CB, dt_proc, dA_cs, states, D, None, x.dtype)),
        "state_bwd": ("state_bwd", lambda: state_bwd(dy, C, dA_cs, states, None, False)),
        "dx": ("dx", lambda: dx_bwd(x, dy, D, B, CB, dt_proc, dA_cs, dS)),
        "dcb": ("dcb", lambda: dcb_bwd(x, dy, CB, dt_proc, dA_cs, 1)),
        "dbc": ("dbc", lambda: dbc_bwd(x, dy, B, C, dCB, dt_proc, dA_cs, states, dS)),
    }
    variants = {
        "state_fwd": [dict(num_stages=4), dict(BLOCK_K=128, num_stages=2)],
        "state_bwd": [dict(num_stages=4), dict(BLOCK_K=128, num_stages=2)],
        "scan_fwd": [dict(num_stages=3), dict(BLOCK_S=64), dict(num_warps=8)],
        "dx": [dict(num_stages=3), dict(BLOCK_K=64), dict(BLOCK_S=64)],
        "dcb": [dict(num_stages=3), dict(BLOCK_M=32, num_warps=2)],
        "dbc": [dict(num_stages=3), dict(BLOCK_S=16), dict(BLOCK_M=32)],
    }
    print("\nSSD launches (ms, median):")
    for name, (kernel, fn) in launches.items():
        base = bench(fn)
        line = f"  {name:10s} {base:7.3f}"
        if sweep and kernel in variants:
            best, best_cfg = base, {}
            for v in variants[kernel]:
                config.OVERRIDES[kernel] = v
                try:
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001
                    line += f" | {v}: failed ({type(e).__name__})"
                    continue
                line += f" | {v}: {ms:.3f}"
                if ms < best:
                    best, best_cfg = ms, v
            config.OVERRIDES[kernel] = best_cfg
            line += f"  -> keep {best_cfg or 'default'}"
        print(line, flush=True)


# ----------------------------------------------------------------------------- conv, norm

def bench_conv(args):
    from strata.kernels.conv.kernel import causal_conv1d_triton
    b, l, d, w = args.batch, args.seqlen, args.nheads * args.headdim + 2 * args.dstate, 4
    import strata.kernels.conv.kernel as conv_mod
    x = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)
    # bf16 weights: the reference's F.conv1d needs one dtype outside autocast.
    wt = (torch.randn(d, w, device="cuda") * 0.3).to(torch.bfloat16)
    bias = torch.randn(d, device="cuda").to(torch.bfloat16)
    err = _errors([x, wt, bias], causal_conv1d_triton, causal_conv1d_ref)
    if args.sweep:
        sweep_knob("conv bwd", conv_mod, "BWD_BLOCKS_PER_PROGRAM", [1, 2, 4, 8, 16],
                   fwd_bwd(causal_conv1d_triton, [leaf(x), leaf(wt), leaf(bias)]))
    nbytes = 2 * 2 * b * l * d
    _run_op("conv1d", [x, wt, bias], causal_conv1d_triton, causal_conv1d_ref, nbytes, nbytes * 3 // 2,
            2 * b * l * d * w, 4 * b * l * d * w, err, args)


def bench_norm(args):
    from strata.kernels.norm.kernel import rmsnorm_triton
    rows = args.batch * args.seqlen
    for name, d, gated in (("rmsnorm", args.d_model, False), ("rmsnorm gated", 2 * args.d_model, True)):
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) if gated else None
        w = torch.rand(d, device="cuda") + 0.5
        ins = [x, w, z] if gated else [x, w]

        def tri(x, w, z=None):
            return rmsnorm_triton(x, w, 1e-5, z, None)

        def ref(x, w, z=None):
            return rmsnorm_ref(x, w, 1e-5, z, None)
        err = _errors(ins, tri, ref)
        if args.sweep:
            import strata.kernels.norm.kernel as norm_mod
            step = fwd_bwd(tri, [leaf(t) for t in ins])
            sweep_knob(name + " bwd", norm_mod, "BWD_NUM_WARPS", [None, 4, 8, 16], step)
            sweep_knob(name + " bwd", norm_mod, "BWD_ELEMENTS", [1024, 2048, 4096, 8192], step)
            sweep_knob(name + " bwd", norm_mod, "BWD_PROGRAMS_PER_SM", [4, 8, 16], step)
        e = rows * d * 2
        fwd_bytes = e * (3 if gated else 2)
        bwd_bytes = e * (5 if gated else 3)
        _run_op(name, ins, tri, ref, fwd_bytes, bwd_bytes, 0, 0, err, args)


def _errors(inputs, tri, ref):
    tin = [leaf(t) for t in inputs]
    rin = [leaf(t, torch.float32) for t in inputs]
    y, y_ref = tri(*tin), ref(*rin)
    g = torch.randn_like(y_ref)
    gt = torch.autograd.grad(y, tin, g.to(y.dtype))
    gr = torch.autograd.grad(y_ref, rin, g)
    return max([rel(y, y_ref)] + [rel(a, r) for a, r in zip(gt, gr)])


def _run_op(op, inputs, tri, ref, fwd_bytes, bwd_bytes, fwd_flops, bwd_flops, err, args):
    det = [t.detach() for t in inputs]
    impls = [("reference", lambda: ref(*det)), ("triton", lambda: tri(*det))]
    if args.compile:
        cref = compiled(ref)
        impls.insert(1, ("compiled ref", lambda: cref(*det)))
    with torch.no_grad():
        run_variants(op, "fwd", impls, fwd_bytes, fwd_flops, err)
    tin = [leaf(t) for t in inputs]
    impls = [("reference", fwd_bwd(ref, tin)), ("triton", fwd_bwd(tri, tin))]
    if args.compile:
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants(op, "fwd+bwd", impls, fwd_bytes + bwd_bytes, fwd_flops + bwd_flops, err, grad_to_none=tin)


# ----------------------------------------------------------------------------- CE, blockdiag

def _peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_ce(args):
    from strata.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    n, d, V = args.batch * args.seqlen, args.d_model, args.vocab
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, d, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda")
    t[::50] = -100
    tin, rin = [leaf(h), leaf(w)], [leaf(h, torch.float32), leaf(w, torch.float32)]
    loss = linear_cross_entropy_triton(tin[0], tin[1], t)
    loss_ref = linear_cross_entropy_ref(rin[0], rin[1], t)
    gt, gr = torch.autograd.grad(loss, tin), torch.autograd.grad(loss_ref, rin)
    err = max(rel(loss, loss_ref), *(rel(a, r) for a, r in zip(gt, gr)))
    del rin, gr, loss_ref
    import strata.kernels.cross_entropy.kernel as ce_mod
    chunk = {"rows": None}
    tri_step = fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, t, chunk_size=chunk["rows"]), tin)
    if args.sweep:
        results = []
        for rows in (None, 1024, 4096, 8192):
            chunk["rows"] = rows
            results.append((bench(tri_step), rows))
        chunk["rows"] = min(results, key=lambda r: r[0])[1]
        print("  sweep linear CE chunk rows: " + ", ".join(f"{r}: {ms:.3f}" for ms, r in results)
              + f" -> {chunk['rows']}")
    print(f"  grad_weight accumulation with addmm(out_dtype=fp32): {ce_mod._ADDMM_OUT_DTYPE[0]}")
    ref_step = fwd_bwd(lambda a, b: linear_cross_entropy_ref(a, b, t), tin)
    # Liger's rule (its chunk_size): the logits chunk no larger than the hidden states
    liger_rows = 1 << (math.ceil(n / math.ceil(V / d)) - 1).bit_length()
    liger_step = fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, t, chunk_size=liger_rows), tin)
    for step in (tri_step, liger_step, ref_step):
        step()  # fix the output gradients outside the memory measurement
    for p in tin:
        p.grad = None
    mem_tri, mem_liger_rows, mem_ref = _peak_mb(tri_step), _peak_mb(liger_step), _peak_mb(ref_step)
    for p in tin:
        p.grad = None
    print(f"linear CE peak memory beyond inputs (fwd+bwd, grads included): fused {mem_tri:.0f} MiB, "
          f"fused at Liger's {liger_rows} rows a chunk {mem_liger_rows:.0f} MiB, naive {mem_ref:.0f} MiB, "
          f"ratio {mem_tri / mem_ref:.3f}")
    flops = 2 * n * V * d
    nbytes = 2 * (n * d + V * d)
    impls = [("reference", ref_step), ("triton", tri_step), (f"triton, {liger_rows}-row chunks", liger_step)]
    if args.compile:
        cref = compiled(lambda a, b: linear_cross_entropy_ref(a, b, t))
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants("linear CE", "fwd+bwd", impls, 2 * nbytes, 3 * flops, err, grad_to_none=tin)
    ROWS[-1]["note"] = f"peak mem {mem_tri:.0f} vs {mem_ref:.0f} MiB"
    memory = {"triton": mem_tri, "reference": mem_ref, f"triton, {liger_rows}-row chunks": mem_liger_rows}
    for r in ROWS:
        if r["op"] == "linear CE" and r["impl"] in memory:
            r["mem_mib"] = memory[r["impl"]]


def bench_blockdiag(args):
    from strata.kernels.blockdiag.kernel import blockdiag_matmul_triton
    n, nb = args.batch * args.seqlen, 4
    k = m = 2 * args.d_model // nb
    x = torch.randn(n, nb * k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(nb, m, k, device="cuda") / k**0.5).to(torch.bfloat16)
    if args.sweep:
        import strata.kernels.blockdiag.kernel as bd_mod
        base = dict(bd_mod.GPU_CONFIG)
        variants = [base, {**base, "num_stages": 4}, {**base, "BLOCK_K": 32, "num_stages": 4},
                    {**base, "BLOCK_N": 256}, {**base, "BLOCK_R": 64, "num_warps": 4}]
        sweep_knob("blockdiag", bd_mod, "GPU_CONFIG", variants,
                   fwd_bwd(lambda x, w: blockdiag_matmul_triton(x, w, False), [leaf(x), leaf(w)]))
        sweep_knob("blockdiag shuffle", bd_mod, "SHUFFLE_MODE", ["copy", "strided", "tiles"],
                   fwd_bwd(lambda x, w: blockdiag_matmul_triton(x, w, True), [leaf(x), leaf(w)]))
    for shuffle in (False, True):
        def tri(x, w):
            return blockdiag_matmul_triton(x, w, shuffle)

        def ref(x, w):
            return blockdiag_matmul_ref(x, w, shuffle)
        err = _errors([x, w], tri, ref)
        e = 2
        nbytes = e * (n * nb * k + nb * m * k + n * nb * m)
        flops = 2 * n * nb * m * k
        _run_op("blockdiag" + (" shuffle" if shuffle else ""), [x, w], tri, ref, nbytes, 2 * nbytes, flops,
                2 * flops, err, args)


# ----------------------------------------------------------------------------- peers

# The same ops of others (../shared/gpu/peers.md): package -> the version measured, its file in
# the wheel folder that ../shared/gpu/wheels.sh fills, and each call used: (module, name,
# parameters passed by name or position). bench/gpu_suite.py --dry-run checks every call against
# the peer's sources in that folder.
PEERS = {
    "mamba_ssm": dict(version="2.3.2.post1", dist="mamba_ssm-2.3.2.post1.tar.gz", calls=[
        ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
         ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "dt_softplus")),
        ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn",
         ("x", "weight", "bias", "z", "eps", "group_size", "norm_before_gate"))]),
    "fla": dict(version="0.6.0", dist="fla_core-0.6.0-py3-none-any.whl", calls=[
        ("fla.ops.simple_gla.chunk", "chunk_simple_gla", ("q", "k", "v", "g", "scale"))]),
    "liger_kernel": dict(version="0.8.5", dist="liger_kernel-0.8.5-py3-none-any.whl", calls=[
        ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss.__init__",
         ("ignore_index",)),
        ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss.forward",
         ("lin_weight", "_input", "target")),
        ("liger_kernel.transformers.rms_norm", "LigerRMSNorm.__init__",
         ("hidden_size", "eps", "casting_mode", "in_place")),
        ("liger_kernel.transformers.rms_norm", "LigerRMSNorm.forward", ("hidden_states",))]),
}


def enter_mamba_ssm() -> None:
    """mamba_ssm's package __init__ imports its CUDA extension (selective_scan_cuda), its Mamba3
    modules (which call triton.set_allocator at import) and its models (transformers' generation
    classes); its Triton SSD and gated norm need none of that. So the package is entered without
    running __init__, and peers.md's stub of selective_scan_cuda is set for anything that asks."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec  # its loader never runs: the module is in sys.modules already
        package.__version__ = PEERS["mamba_ssm"]["version"]
        sys.modules["mamba_ssm"] = package


ONLY_PEERS: set[str] = set()
"""--only-peers: the packages to run (empty: all)."""


def peer(package: str, module: str, name: str):
    """(the peer's function or class, '') or (None, why not: 'not installed' or 'import failed: ...')."""
    if ONLY_PEERS and package not in ONLY_PEERS:
        return None, "left out (--only-peers)"
    if package not in sys.modules and importlib.util.find_spec(package) is None:
        return None, "not installed"
    try:
        if package == "mamba_ssm":
            enter_mamba_ssm()
        return getattr(importlib.import_module(module), name.split(".")[0]), ""
    except Exception as e:  # noqa: BLE001 (a broken peer is a row, not the end of the run)
        return None, f"import failed: {type(e).__name__}: {str(e)[:70]}"


def peer_label(package: str) -> str:
    return f"{package} {PEERS[package]['version']}"


def strata_ms(op: str, mode: str) -> float | None:
    return next((r["ms"] for r in ROWS if r["op"] == op and r["mode"] == mode and r["impl"] == "triton"), None)


def vs_strata(op: str, mode: str, ms: float) -> str:
    mine = strata_ms(op, mode)
    if mine is None or not ms == ms:  # nan: the peer failed
        return ""
    return f"Strata {ms / mine:.2f}x faster" if ms >= mine else f"Strata {mine / ms:.2f}x slower"


def run_peer(op, label, fn, inputs, nbytes_fwd, nbytes_bwd, flops_fwd, flops_bwd, err, note="",
             modes=("fwd", "fwd+bwd"), memory=False):
    """Time a peer's forward (no grad) and forward + backward as Strata's rows are timed; with memory,
    also its peak memory beyond the inputs (forward + backward, gradients included)."""
    det = [t.detach() for t in inputs]
    tin = [leaf(t) for t in inputs]
    for mode in modes:
        notes = []
        if mode == "fwd":
            with torch.no_grad():
                run_variants(op, mode, [(label, lambda: fn(*det))], nbytes_fwd, flops_fwd, err)
        else:
            step = fwd_bwd(fn, tin)
            if memory:
                step()  # fixes the output gradient outside the measurement
                for t in tin:
                    t.grad = None
                mem = _peak_mb(step)
                notes.append(f"peak mem {mem:.0f} MiB")
                for t in tin:
                    t.grad = None
            run_variants(op, mode, [(label, step)], nbytes_fwd + nbytes_bwd, flops_fwd + flops_bwd, err,
                         grad_to_none=tin)
        row = ROWS[-1]
        row["err"] = err
        if memory and mode != "fwd":
            row["mem_mib"] = mem
        row["note"] = "; ".join(x for x in (row["note"], *notes, vs_strata(op, mode, row["ms"]), note) if x)
        torch.cuda.synchronize()


def missing_peer(op, label, why):
    if not why.startswith("left out"):
        add_row(op, "-", label, float("nan"), 0, 0, note=why)


def peer_ssd(args, warm=False):
    inputs, dims = ssd_case(args)
    b, l, h, p, g, n, L = dims
    fb, bb, ff, bf = ssd_cost(dims)
    y_ref, g_ref, gy = None, None, torch.randn(inputs[0].shape, device="cuda")
    if not warm:  # the fp32 reference on the same inputs, for the bf16 errors
        ref_in = [leaf(t, torch.float32) for t in inputs]
        y_ref = ssd_chunked_ref(*ref_in[:5], L, D=ref_in[5], dt_bias=ref_in[6], dt_softplus=True)
        g_ref = torch.autograd.grad(y_ref, ref_in, gy)
    mamba, why = peer("mamba_ssm", *PEERS["mamba_ssm"]["calls"][0][:2])
    if mamba is None:
        missing_peer("ssd", peer_label("mamba_ssm"), why)
    else:
        def mamba_ssd(x, dt, A, B, C, D, dt_bias):
            return mamba(x, dt, A, B, C, L, D=D, z=None, dt_bias=dt_bias, dt_softplus=True)
        _peer_ssd_rows("mamba_ssm", mamba_ssd, inputs, y_ref, gy, g_ref, (fb, bb, ff, bf), warm,
                       "Triton SSD, mamba_chunk_scan_combined")
    gla, why = peer("fla", *PEERS["fla"]["calls"][0][:2])
    if gla is None:
        missing_peer("ssd", peer_label("fla"), why)
    else:
        def fla_ssd(x, dt, A, B, C, D, dt_bias):
            heads, groups = x.shape[2], B.shape[2]
            dt = torch.nn.functional.softplus(dt.float() + dt_bias)
            q = C.repeat_interleave(heads // groups, dim=2)
            k = B.repeat_interleave(heads // groups, dim=2)
            v = (x * dt.unsqueeze(-1)).to(x.dtype)
            o, _ = gla(q, k, v, g=dt * A, scale=1.0)
            return o + x * D[:, None].to(x.dtype)
        _peer_ssd_rows("fla", fla_ssd, inputs, y_ref, gy, g_ref, (fb, bb, ff, bf), warm,
                       "chunk_simple_gla per head; softplus, B/C to heads, D skip in PyTorch")


def _peer_ssd_rows(package, fn, inputs, y_ref, gy, g_ref, cost, warm, note):
    tin = [leaf(t) for t in inputs]
    y = fn(*tin)
    grads = torch.autograd.grad(y, tin, gy.to(y.dtype), allow_unused=True)
    if warm:
        return
    errs = [rel(y, y_ref)] + [rel(a, r) for a, r in zip(grads, g_ref) if a is not None]
    fb, bb, ff, bf = cost
    run_peer("ssd", peer_label(package), fn, inputs, fb, bb, ff, bf, max(errs),
             note=f"{note}; out err {errs[0]:.1e}")


def peer_norm(args, warm=False):
    rows = args.batch * args.seqlen
    d = args.d_model
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda") + 0.5
    liger_norm, why = peer("liger_kernel", *PEERS["liger_kernel"]["calls"][2][:2])
    if liger_norm is None:
        missing_peer("rmsnorm", peer_label("liger_kernel"), why)
    else:
        module = liger_norm(d, eps=1e-5, casting_mode="llama", in_place=False).cuda()

        def liger(x, w):
            return torch.func.functional_call(module, {"weight": w}, (x,))
        _peer_rows("rmsnorm", "liger_kernel", liger, [x, w], lambda x, w: rmsnorm_ref(x, w, 1e-5), rows * d * 2,
                   warm, (2, 3), "LigerRMSNorm, casting_mode llama, in_place off (each timed backward keeps its "
                                 "output gradient)")
    d = 2 * args.d_model
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda") + 0.5
    gated, why = peer("mamba_ssm", *PEERS["mamba_ssm"]["calls"][1][:2])
    if gated is None:
        missing_peer("rmsnorm gated", peer_label("mamba_ssm"), why)
    else:
        def mamba_norm(x, w, z):
            return gated(x, w, None, z=z, eps=1e-5, group_size=None, norm_before_gate=False)
        _peer_rows("rmsnorm gated", "mamba_ssm", mamba_norm, [x, w, z],
                   lambda x, w, z: rmsnorm_ref(x, w, 1e-5, z, None), rows * d * 2, warm, (3, 5),
                   "rmsnorm_fn, norm_before_gate=False (Mamba2's)")


def _peer_rows(op, package, fn, inputs, ref, e, warm, passes, note):
    if warm:
        tin = [leaf(t) for t in inputs]
        y = fn(*tin)
        torch.autograd.grad(y, tin, torch.randn_like(y))
        return
    err = _errors(inputs, fn, ref)
    run_peer(op, peer_label(package), fn, inputs, e * passes[0], e * passes[1], 0, 0, err, note=note)


def peer_ce(args, warm=False):
    n, d, V = args.batch * args.seqlen, args.d_model, args.vocab
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, d, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda")
    t[::50] = -100
    loss_class, why = peer("liger_kernel", *PEERS["liger_kernel"]["calls"][1][:2])
    if loss_class is None:
        missing_peer("linear CE", peer_label("liger_kernel"), why)
        return
    loss_fn = loss_class(ignore_index=-100)

    def liger(h, w):
        return loss_fn(w, h, t)
    if warm:
        tin = [leaf(h), leaf(w)]
        torch.autograd.grad(liger(*tin), tin)
        return
    err = _errors([h, w], liger, lambda a, b: linear_cross_entropy_ref(a, b, t))
    flops, nbytes = 2 * n * V * d, 2 * (n * d + V * d)
    run_peer("linear CE", peer_label("liger_kernel"), liger, [h, w], nbytes, nbytes, flops, 2 * flops, err,
             modes=("fwd+bwd",), memory=True,
             note="LigerFusedLinearCrossEntropyLoss, defaults (its grad_weight accumulates in the input dtype)")


PEER_BENCHES = {"ssd": peer_ssd, "norm": peer_norm, "ce": peer_ce}


def bench_peers(args, ops, warm=False):
    for op in ops:
        if op not in PEER_BENCHES:
            continue
        t0 = time.time()
        try:
            PEER_BENCHES[op](args, warm)
        except Exception as e:  # noqa: BLE001 (report and go on)
            import traceback
            traceback.print_exc()
            add_row(op, "-", "peers", float("nan"), 0, 0, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
        print(f"[{op} peers {'warmed' if warm else 'done'} in {time.time() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main

def grouped_rows() -> list[dict]:
    """ROWS with each op's rows together (peers run last, after all of Strata's ops)."""
    order = list(dict.fromkeys(r["op"] for r in ROWS))
    return sorted(ROWS, key=lambda r: order.index(r["op"]))


def print_table(args, file=None):
    hdr = "| op | pass | impl | ms | GB/s | % HBM | TFLOP/s | % peak | vs ref | bf16 err | note |"
    print("\n" + hdr + "\n|" + "---|" * 11, file=file)
    for r in grouped_rows():
        gbs = "" if r["gbs"] is None else f"{r['gbs']:.0f}"
        hbm = "" if r["gbs"] is None else f"{100 * r['gbs'] / (args.hbm_tbs * 1e3):.0f}"
        tf = "" if r["tflops"] is None else f"{r['tflops']:.1f}"
        pk = "" if r["tflops"] is None else f"{100 * r['tflops'] / args.peak_tflops:.0f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        er = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['op']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {gbs} | {hbm} | {tf} | {pk} | {sp} | {er} | "
              f"{r['note']} |", file=file)


def write_json(args, path):
    """The rows, the shapes and the machine, for bench/gpu_suite.py (NaN ms: the variant failed)."""
    import triton
    shapes = {k: getattr(args, k) for k in ("batch", "seqlen", "d_model", "nheads", "headdim", "dstate", "chunk",
                                            "vocab")}
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "shapes": shapes, "hbm_tbs": args.hbm_tbs, "peak_tflops": args.peak_tflops, "rows": grouped_rows()}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="ssd,conv,norm,ce,blockdiag")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--nheads", type=int, default=64)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--sweep", action="store_true", help="try SSD block-size variants and keep the fastest")
    ap.add_argument("--breakdown", action="store_true", help="time each SSD launch alone")
    ap.add_argument("--table-file", help="also write the table here after each op")
    ap.add_argument("--hbm-tbs", type=float, default=3.0)
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out mamba_ssm, fla and Liger (they run after Strata's ops)")
    ap.add_argument("--warm-peers", action="store_true",
                    help="only call each peer of --ops once (fills Triton's caches) and exit")
    ap.add_argument("--only-peers", default="", help="comma-separated peer packages to run (default: all of PEERS)")
    ap.add_argument("--json", help="also write the rows here (after each op), for bench/gpu_suite.py")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    torch.manual_seed(0)
    ops = args.ops.split(",")
    ONLY_PEERS.update(p for p in args.only_peers.split(",") if p)
    if args.warm_peers:
        bench_peers(args, ops, warm=True)
        return
    if "ssd" in ops and (args.sweep or args.breakdown):
        ssd_breakdown(args, args.sweep)
    table = {"ssd": bench_ssd, "conv": bench_conv, "norm": bench_norm, "ce": bench_ce, "blockdiag": bench_blockdiag}
    for op in ops:
        t0 = time.time()
        try:
            table[op](args)
        except Exception as e:  # noqa: BLE001 (report and go on to the next op)
            import traceback
            traceback.print_exc()
            add_row(op, "-", "-", float("nan"), 0, 0, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
        print(f"[{op} done in {time.time() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()
        if args.table_file:
            with open(args.table_file, "w") as f:
                print_table(args, f)
        if args.json:
            write_json(args, args.json)
    if args.peers:
        bench_peers(args, ops)
        if args.json:
            write_json(args, args.json)
    print_table(args)


if __name__ == "__main__":
    main()
