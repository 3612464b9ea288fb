"""``OffPrincipalAdamW(capturable=True)``: a step that can be captured in a CUDA graph (issue 17, finding 16).

On CPU: after a warm-up step, ``step()`` calls no host-read method of any tensor, allocates no pinned host memory and
records no CUDA event, also for unprojected parameters and when a gradient is not finite; the skip is reported by
``report_nonfinite()`` only; the trajectory is torch AdamW's capturable one. torch's capturable AdamW refuses CPU
parameters by a device whitelist alone (its code is device-agnostic tensor math); the tests widen that whitelist to
run torch's real capturable code here. On a CUDA GPU: capture one step in ``torch.cuda.graph``, replay it, and match
eager steps (``benchmarks/gpu.sh`` runs it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from offprincipal.optim import OffPrincipalAdamW
from offprincipal.projection import principal_leak

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)
        self.norm = nn.LayerNorm(12)


def _make(device="cpu", seed=0):
    torch.manual_seed(seed)
    return Tiny().to(device)


def _optimizer(model, **kw):
    return OffPrincipalAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, top_k=3, cache_dir=False,
                             progress=False, **kw)


@pytest.fixture
def cpu_capturable(monkeypatch):
    """Let torch's capturable AdamW code run on CPU tensors (only its device whitelist says no)."""
    import torch.optim.adam as adam_module

    supported = adam_module._get_capturable_supported_devices
    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices", lambda *a, **k: supported(*a, **k) + ["cpu"])


def _forbid_host_traffic(patch):
    def forbidden(what):
        def raiser(*args, **kwargs):
            raise AssertionError(f"step() called {what}")
        return raiser

    for name in HOST_READS:
        patch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    empty = torch.empty

    def no_pinned(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise AssertionError("step() allocated pinned host memory")
        return empty(*args, **kwargs)

    patch.setattr(torch, "empty", no_pinned)
    patch.setattr(torch.cuda, "Event", forbidden("torch.cuda.Event"))


def _grads(model, gen, nan=False):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
    if nan:
        model.up.weight.grad[3, 5] = float("nan")


def test_capturable_step_reads_nothing_back_and_reports_skips_on_request(cpu_capturable, monkeypatch):
    model = _make()
    opt = _optimizer(model, capturable=True)
    assert set(opt.bases) == {"up.weight", "down.weight"}, "biases and the norm step unprojected"
    gen = torch.Generator().manual_seed(1)
    _grads(model, gen)
    opt.step()  # warm-up: lazy state, (UᵀW, WV), the counters
    for p in model.parameters():
        assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].ndim == 0
    up_before = model.up.weight.detach().clone()
    up_state = {k: v.clone() for k, v in opt.state[model.up.weight].items()}
    bias_before = model.up.bias.detach().clone()
    with monkeypatch.context() as patch:
        _forbid_host_traffic(patch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning during the steps either
            _grads(model, gen, nan=True)
            opt.step()
            _grads(model, gen, nan=True)
            opt.step()
    assert torch.equal(model.up.weight, up_before), "a non-finite gradient skips the projected weight"
    for key, value in up_state.items():
        assert torch.equal(opt.state[model.up.weight][key], value), key
    assert not torch.equal(model.up.bias, bias_before), "the unprojected bias steps (torch's capturable AdamW)"
    assert torch.equal(opt.state[model.down.weight]["step"], torch.tensor(3.0))
    with pytest.warns(RuntimeWarning, match=r"'up.weight'.*2 step\(s\) skipped"):
        assert opt.report_nonfinite() == ["up.weight"]
    assert opt.report_nonfinite() == [], "each skip is reported once"


def test_capturable_trajectory_matches_the_default_step(cpu_capturable):
    """capturable=True changes where the bookkeeping lives, not the arithmetic: 5 steps follow capturable=False
    to fp32 rounding (bias corrections in fp32 on the device, as torch's capturable AdamW computes them)."""
    runs = []
    for capturable in (False, True):
        model = _make()
        opt = _optimizer(model, capturable=capturable)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            _grads(model, gen)
            opt.step()
        runs.append((model, opt))
    (a, opt_a), (b, _) = runs
    w0 = _make()
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), w0.parameters()):
        change = (p - p0).abs().max().item()
        assert (p - q).abs().max().item() <= 1e-5 * change, name
    U, V = opt_a.bases["up.weight"]
    assert max(principal_leak((b.up.weight - w0.up.weight).detach(), U, V)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it)")
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
def test_cuda_graph_capture_and_replay_match_eager_steps(master):
    """Capture one OffPrincipalAdamW step (fused Triton kernels, torch's capturable AdamW for the rest) in a CUDA
    graph; replaying it with new gradients copied into the captured .grad tensors follows an eager twin to fp32
    rounding, stays off-principal, and a NaN gradient during a replay skips the weight and is reported afterwards."""
    dtype = torch.bfloat16 if master else torch.float32
    models = [_make("cuda").to(dtype) for _ in range(2)]
    opts = [_optimizer(m, capturable=True, master_weights=master) for m in models]
    graphed, eager = models
    gen = torch.Generator(device="cuda").manual_seed(4)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen).to(dtype) for p in graphed.parameters()]
             for _ in range(8)]

    def set_grads(model, values):
        for p, g in zip(model.parameters(), values):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):  # warm-up: state, kernel compiles
            for model, opt in zip(models, opts):
                set_grads(model, grads[i])
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for i in range(2, 8):
        set_grads(graphed, grads[i])
        graph.replay()
        set_grads(eager, grads[i])
        opts[1].step()
    torch.cuda.synchronize()
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        ref = opts[1].state[q].get("master_param", q).float()
        ours = opts[0].state[p].get("master_param", p).float()
        assert (ours - ref).abs().max().item() <= 1e-6 * max(ref.abs().max().item(), 1e-3), name
    start = _make("cuda").to(dtype)
    U, V = opts[0].bases["up.weight"]
    delta = opts[0].state[graphed.up.weight].get("master_param", graphed.up.weight).float() - start.up.weight.float()
    if not master:
        assert max(principal_leak(delta, U, V)) < 1e-5
    before = graphed.up.weight.detach().clone()
    poisoned = [g.clone() for g in grads[0]]
    poisoned[0][0, 0] = float("nan")  # up.weight is the first parameter
    set_grads(graphed, poisoned)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed.up.weight, before)
    with pytest.warns(RuntimeWarning, match="up.weight"):
        assert opts[0].report_nonfinite() == ["up.weight"]
