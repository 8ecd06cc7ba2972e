"""The chunked SSD (training) equals the token-by-token recurrence (decoding), in float64."""
import pytest
import torch

from strata.kernels.ssd.reference import ssd_chunked_ref, ssd_recurrent_ref
from strata.model.config import MambaConfig
from strata.model.mamba2 import Mamba2Mixer


def random_ssd_inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=torch.float64) * 4 - 0.5,
                B=r(b, l, g, n), C=r(b, l, g, n), D=r(h), z=r(b, l, h, p), dt_bias=r(h))


@pytest.mark.parametrize("seqlen,chunk,groups", [(1, 8, 1), (37, 8, 2), (64, 16, 1), (70, 32, 4)])
def test_chunked_scan_equals_recurrence(seqlen, chunk, groups):
    t = random_ssd_inputs(2, seqlen, 4, 8, groups, 16)
    init = torch.randn(2, 4, 8, 16, dtype=torch.float64)
    y, final = ssd_chunked_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], z=t["z"],
                               dt_bias=t["dt_bias"], dt_softplus=True, initial_states=init,
                               return_final_states=True)
    y_rec, final_rec = ssd_recurrent_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                         dt_bias=t["dt_bias"], dt_softplus=True, initial_states=init)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_rec, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ngroups,seqlen", [(1, 50), (2, 33)])
def test_mixer_chunked_forward_equals_token_by_token(ngroups, seqlen):
    torch.manual_seed(0)
    cfg = MambaConfig(d_state=16, headdim=16, ngroups=ngroups, chunk_size=16, d_conv=4)
    mixer = Mamba2Mixer(cfg, d_model=32).double()
    u = torch.randn(2, seqlen, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u)
        cache = mixer.allocate_cache(2, dtype=torch.float64)
        steps = torch.cat([mixer(u[:, t:t + 1], cache=cache) for t in range(seqlen)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


def test_mixer_prefill_then_steps_equals_full_forward():
    torch.manual_seed(1)
    mixer = Mamba2Mixer(MambaConfig(d_state=16, headdim=16, chunk_size=8), d_model=32).double()
    u = torch.randn(1, 40, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u)
        cache = mixer.allocate_cache(1, dtype=torch.float64)
        prefix = mixer(u[:, :21], cache=cache)
        rest = torch.cat([mixer(u[:, t:t + 1], cache=cache) for t in range(21, 40)], dim=1)
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full, rtol=1e-10, atol=1e-10)
