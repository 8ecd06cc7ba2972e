"""What bench/kernel_speed.py and bench/kernel_peers.py share: the rows of the table (ROWS) and how
each is timed (triton.testing.do_bench, forward or forward + backward with a fixed output gradient), the
bf16 error against an fp32 reference, the peak memory beyond the inputs, the SSD's case and cost at the
benchmark's shapes, and the table printed or written as JSON (for bench/gpu_suite.py)."""
from __future__ import annotations

import json
import os

import torch

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


def max_error(inputs, tri, ref):
    tin = [leaf(t) for t in inputs]
    rin = [leaf(t, torch.float32) for t in inputs]
    y, y_ref = tri(*tin), ref(*rin)
    g = torch.randn_like(y_ref)
    gt = torch.autograd.grad(y, tin, g.to(y.dtype))
    gr = torch.autograd.grad(y_ref, rin, g)
    return max([rel(y, y_ref)] + [rel(a, r) for a, r in zip(gt, gr)])


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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

