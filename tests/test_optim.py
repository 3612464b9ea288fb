"""OffPrincipalAdamW and OffPrincipalOptimizer on CPU (torch reference path)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from offprincipal.optim import DEFAULT_EXCLUDE, OffPrincipalAdamW, OffPrincipalOptimizer, adamw_update_
from offprincipal.projection import principal_leak, project

LEAK_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """Embedding, two projected matrices (one tall, one wide), a bias, a norm and an LM head."""

    def __init__(self, dtype=torch.float32, vocab=50, d=24, h=40):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, h, bias=True)
        self.down = nn.Linear(h, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.to(dtype)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.lm_head(self.norm(x))


PROJECTED = ("up.weight", "down.weight")


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Tiny(dtype)


def random_grads(model, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def leaks(opt, before, model):
    """{name: max(left, right) leak of W_now − W_before} for every projected weight."""
    out = {}
    for name, p in model.named_parameters():
        if name in opt.bases:
            basis = opt.bases.entries[name]
            left, right = principal_leak(p.detach().float() - before[name].float(), basis.U, basis.V)
            out[name] = {"both": max(left, right), "left": left, "right": right}[opt.sides]
    return out


def adamw(**kw):
    kw.setdefault("cache_dir", False)
    kw.setdefault("progress", False)
    return kw


# --- arithmetic -------------------------------------------------------------------------------------------------


def test_default_selection_projects_only_matrices_outside_embeddings_and_head():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, **adamw())
    assert set(opt.bases.entries) == set(PROJECTED)
    assert DEFAULT_EXCLUDE == ("embed", "lm_head", "wte", "wpe")
    model.down.weight.requires_grad_(False)  # frozen weights need no bases
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, **adamw())
    assert set(opt.bases) == {"up.weight"}
    U, V = opt.bases["up.weight"]
    assert U.shape == (40, 4) and V.shape == (24, 4) and U.dtype == V.dtype == torch.float32


def test_unprojected_params_step_bitwise_like_torch_adamw():
    """Excluded (and 1-D) params go through torch's own AdamW code: bitwise equal trajectories and states."""
    ours, ref = make(), make()
    opt = OffPrincipalAdamW(ours.named_parameters(), lr=1e-2, weight_decay=0.1, exclude=(".",), **adamw())
    assert len(opt.bases) == 0
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        random_grads(ours, gen_a)
        random_grads(ref, gen_b)
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), (name, key)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_function_unprojected_is_adamw_arithmetic(weight_decay):
    """adamw_update_ with the projection off: moments bitwise equal to torch AdamW; the weight bitwise without
    weight decay; with it, within 2 fp32 ulps of |W| + |update| per step (torch evaluates W·(1−lr·wd) − step,
    we W − (step + lr·wd·W): the same math rounded differently)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(30, 20, generator=gen)
    ref = nn.Parameter(W.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=weight_decay)
    p, m, v = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
    for t in range(1, 11):
        g = torch.randn(W.shape, generator=gen)
        before = ref.detach().clone()
        p.copy_(before)  # compare single steps from the same weight
        ref.grad = g.clone()
        ref_opt.step()
        adamw_update_(p, g, m, v, t, None, None, None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=weight_decay)
        state = ref_opt.state[ref]
        assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"]), f"moments differ at step {t}"
        if weight_decay == 0:
            assert torch.equal(p, ref.detach()), f"weight differs at step {t}"
        else:
            w_old, w_new = before, ref.detach()
            bound = 2 * torch.finfo(torch.float32).eps * (w_old.abs() + (w_old - w_new).abs())
            assert ((p - w_new).abs() <= bound).all(), f"weight differs by more than 2 ulps at step {t}"


def test_update_is_the_projection_of_the_adamw_update():
    """W_{t+1} = W_t − P(AdamW update), with AdamW's moments unchanged by the projection (they only see grads)."""
    ours, ref = make(), make()
    opt = OffPrincipalAdamW(ours.named_parameters(), lr=1e-2, weight_decay=0.1, top_k=5, **adamw())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    ref_named = dict(ref.named_parameters())
    for _ in range(3):
        before = snapshot(ours)
        for name, p in ref_named.items():  # the reference steps from our current weights
            p.data.copy_(before[name])
        random_grads(ours, gen_a)
        random_grads(ref, gen_b)
        opt.step()
        ref_opt.step()
        for name, p in ours.named_parameters():
            if name not in PROJECTED:
                continue
            basis = opt.bases.entries[name]
            expected = before[name] - project(before[name] - ref_named[name].detach(), basis.U, basis.V)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
            assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[ref_named[name]]["exp_avg"]), name


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_leak_stays_below_1e_5_after_1000_fp32_steps(sides):
    model = make()
    before = snapshot(model)
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01, top_k=6, sides=sides, **adamw())
    gen = torch.Generator().manual_seed(3)
    for _ in range(1000):
        random_grads(model, gen)
        opt.step()
    for name, leak in leaks(opt, before, model).items():
        assert leak <= LEAK_TOL, f"{name}: leak {leak:.2e} after 1000 steps (sides={sides})"
    assert (model.up.weight - before["up.weight"]).norm() > 0.1


# --- state dict -------------------------------------------------------------------------------------------------


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(model, opt, gen, steps):
    for _ in range(steps):
        random_grads(model, gen)
        opt.step()


def test_state_dict_has_adamw_layout_and_loads_weights_only():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, **adamw())
    train(model, opt, torch.Generator().manual_seed(0), 2)
    sd = roundtrip(opt.state_dict())
    ref_sd = torch.optim.AdamW(model.parameters()).state_dict()
    assert set(sd) == {"state", "param_groups", "offprincipal"}
    assert set(sd["param_groups"][0]) == set(ref_sd["param_groups"][0]) | {"param_names"}
    for state in sd["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
    assert set(sd["offprincipal"]["bases"]) == set(PROJECTED)
    torch.optim.AdamW(model.parameters()).load_state_dict(sd)  # a plain AdamW can load it too


@pytest.mark.parametrize("cls,sides", [("adamw", "both"), ("adamw", "left"), ("adamw", "right"), ("sgd", "both")])
def test_resume_from_trained_weights_follows_the_same_trajectory(cls, sides):
    """Save after 4 steps, rebuild model and optimizer from the *trained* weights (whose own bases differ),
    load the state: the optimizer fetches the original bases from the cache, certifies them against the trained
    weights (off-principal training keeps them singular pairs, on the side(s) projected) and continues
    identically. AdamW at lr 3e-2 moves every entry by about 0.1, half the weights' scale."""

    def build(model):
        if cls == "adamw":
            return OffPrincipalAdamW(model.named_parameters(), lr=3e-2, top_k=4, sides=sides, progress=False)
        # lr 0.02: the 4 steps of N(0, 1) gradients move the weights by about their k-th singular value; at 0.1
        # they would move by 5× it and the saved bases would no longer be certifiable as the top k (TRAINED_TOPK_TOL)
        base = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        return OffPrincipalOptimizer(base, model.named_parameters(), top_k=4, sides=sides, progress=False)

    model = make()
    opt = build(model)
    gen = torch.Generator().manual_seed(5)
    train(model, opt, gen, 4)
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(model, opt, gen, 4)

    resumed = make(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = build(resumed)
    assert not torch.equal(opt2.bases.entries["up.weight"].U, opt.bases.entries["up.weight"].U)
    opt2.load_state_dict(saved_opt)
    gen.set_state(gen_state)
    train(resumed, opt2, gen, 4)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} diverged after resuming"


def test_resume_without_the_original_bases_is_a_clear_error():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, cache_dir=False, progress=False)
    train(model, opt, torch.Generator().manual_seed(0), 2)
    saved = roundtrip(opt.state_dict())
    opt2 = OffPrincipalAdamW(model.named_parameters(), top_k=4, cache_dir=False, progress=False)
    with pytest.raises(RuntimeError, match="subspaces=compute_subspaces"):
        opt2.load_state_dict(saved)
    opt3 = OffPrincipalAdamW(model.named_parameters(), top_k=4, exclude=DEFAULT_EXCLUDE + ("down",), **adamw())
    with pytest.raises(ValueError, match="different set of weights"):
        opt3.load_state_dict(saved)


# --- training-loop features -------------------------------------------------------------------------------------


def test_training_loop_with_accumulation_clipping_scheduler_and_zero_grad():
    model = make()
    before = snapshot(model)
    opt = OffPrincipalAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.01, top_k=4, **adamw())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (6, 9), generator=gen)
    losses = []
    for step in range(8):
        for micro in ids.split(3):  # gradient accumulation over 2 micro-batches
            logits = model(micro[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 50), micro[:, 1:].reshape(-1)) / 2
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=step % 2 == 0)
        losses.append(loss.item())
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 / 9)
    assert losses[-1] < losses[0]
    for name, leak in leaks(opt, before, model).items():
        assert leak <= LEAK_TOL, name


def test_params_without_grad_are_untouched_and_lr_zero_freezes():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, **adamw())
    gen = torch.Generator().manual_seed(0)
    random_grads(model, gen)
    model.down.weight.grad = None
    before = snapshot(model)
    opt.step()
    assert torch.equal(model.down.weight, before["down.weight"]) and model.down.weight not in opt.state
    assert not torch.equal(model.up.weight, before["up.weight"])
    opt.param_groups[0]["lr"] = 0.0
    before = snapshot(model)
    random_grads(model, gen)
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_param_groups_with_names_and_precomputed_subspaces():
    model = make()
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, named[n]) for n in PROJECTED], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named.items() if n not in PROJECTED], "weight_decay": 0.0},
    ]
    U, _, Vh = torch.linalg.svd(model.up.weight.detach())  # given bases are certified: they must be the top k
    U, V = U[:, :3], Vh[:3].T
    opt = OffPrincipalAdamW(groups, lr=1e-2, subspaces={"up.weight": (U, V)}, **adamw())
    assert set(opt.bases.entries) == {"up.weight"}
    before = snapshot(model)
    train(model, opt, torch.Generator().manual_seed(0), 5)
    left, right = principal_leak(model.up.weight.detach() - before["up.weight"], U, V)
    assert max(left, right) <= LEAK_TOL


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)])
def test_low_precision_params_step(dtype, master):
    """Moments live in the param dtype like torch AdamW's, or in fp32 with master weights. fp16 moments
    underflow (torch AdamW's fp16 step gives inf with eps=1e-8), hence master weights for fp16."""
    model = make(dtype)
    before = snapshot(model)
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, master_weights=master, **adamw())
    train(model, opt, torch.Generator().manual_seed(0), 5)
    for name, p in model.named_parameters():
        assert p.dtype == dtype and torch.isfinite(p).all(), name
        assert opt.state[p]["exp_avg"].dtype == (torch.float32 if master else dtype)
    assert not torch.equal(model.up.weight, before["up.weight"])


def test_bf16_rounding_leak_and_fp32_master_weights():
    """bf16 storage rounds every step, and the rounding error is not off-principal; fp32 master weights keep the
    trajectory exact (the stored bf16 weight is then the rounding of an exactly off-principal weight)."""
    plain, mastered = make(torch.bfloat16), make(torch.bfloat16)
    before = snapshot(plain)
    opt_plain = OffPrincipalAdamW(plain.named_parameters(), lr=1e-3, top_k=4, **adamw())
    opt_master = OffPrincipalAdamW(mastered.named_parameters(), lr=1e-3, top_k=4, master_weights=True, **adamw())
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    train(plain, opt_plain, gen_a, 50)
    train(mastered, opt_master, gen_b, 50)
    leak_plain = max(leaks(opt_plain, before, plain).values())
    assert leak_plain > 10 * LEAK_TOL  # the rounding of the stored weight leaks visibly
    for name in PROJECTED:
        p = dict(mastered.named_parameters())[name]
        state = opt_master.state[p]
        assert state["master_param"].dtype == state["exp_avg"].dtype == torch.float32
        assert torch.equal(p, state["master_param"].to(torch.bfloat16))
        basis = opt_master.bases.entries[name]
        left, right = principal_leak(state["master_param"] - before[name].float(), basis.U, basis.V)
        assert max(left, right) <= LEAK_TOL, name
    sd = roundtrip(opt_master.state_dict())
    same_bases = {n: (opt_master.bases.entries[n].U, opt_master.bases.entries[n].V) for n in PROJECTED}
    opt_again = OffPrincipalAdamW(mastered.named_parameters(), lr=1e-3, master_weights=True, subspaces=same_bases,
                                  **adamw())
    opt_again.load_state_dict(sd)
    p = mastered.up.weight
    assert opt_again.state[p]["master_param"].dtype == torch.float32
    assert torch.equal(opt_again.state[p]["master_param"], opt_master.state[p]["master_param"])


# --- errors -----------------------------------------------------------------------------------------------------


def test_clear_errors():
    model = make()
    with pytest.raises(ValueError, match="named_parameters"):
        OffPrincipalAdamW(model.parameters(), **adamw())
    with pytest.raises(ValueError, match="amsgrad"):
        OffPrincipalAdamW(model.named_parameters(), amsgrad=True, **adamw())
    with pytest.raises(ValueError, match="sides"):
        OffPrincipalAdamW(model.named_parameters(), sides="top", **adamw())
    with pytest.raises(ValueError, match="backend"):
        OffPrincipalAdamW(model.named_parameters(), backend="cuda", **adamw())
    with pytest.raises(ValueError, match=r"up\.weight.*top_k_pattern"):
        OffPrincipalAdamW(model.named_parameters(), top_k=30, **adamw())
    with pytest.raises(ValueError, match="named_parameters"):
        OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **adamw())


def test_deepspeed_zero_is_refused_with_one_line_saying_what_to_use():
    from offprincipal.integrations.deepspeed import ZERO_REFUSAL

    model = make()
    model.up.weight.ds_id = 3  # what ZeRO-3 attaches to its parameters
    with pytest.raises(RuntimeError) as refused:
        OffPrincipalAdamW(model.named_parameters(), top_k=4, **adamw())
    assert str(refused.value) == ZERO_REFUSAL.format(owner="OffPrincipalAdamW", what="the parameter 'up.weight'")
    assert "\n" not in str(refused.value) and "any sharding" not in str(refused.value)
    assert "OffPrincipalConfig" in str(refused.value) and "FSDP2" in str(refused.value)
    del model.up.weight.ds_id
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, **adamw())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))  # ZeRO-1/2 flattening
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="OffPrincipalConfig"):
        opt.step()


def test_triton_backend_on_cpu_is_a_clear_error():
    from offprincipal import kernels
    from offprincipal.projection import project_

    if kernels.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter, where CPU tensors are allowed")
    D = torch.randn(8, 6)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        project_(D, torch.linalg.qr(torch.randn(8, 2)).Q, torch.linalg.qr(torch.randn(6, 2)).Q, backend="triton")
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, backend="triton", **adamw())  # constructing is fine
    random_grads(model, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="cannot run on param"):
        opt.step()


# --- any base optimizer -----------------------------------------------------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion-style sign update (Chen et al. 2023), a base optimizer that is not in torch."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)


BASES = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=0.01),
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("base", sorted(BASES))
def test_wrapper_projects_the_base_update_exactly(base):
    model, ref = make(), make()
    opt = OffPrincipalOptimizer(BASES[base](model.parameters()), model.named_parameters(), top_k=5, **adamw())
    ref_opt = BASES[base](ref.parameters())
    ref_named = dict(ref.named_parameters())
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    start = snapshot(model)
    for step in range(200):
        before = snapshot(model)
        random_grads(model, gen_a)
        random_grads(ref, gen_b)
        if step < 2:  # the reference base steps from our weights; both keep identical optimizer state
            for name, p in ref_named.items():
                p.data.copy_(before[name])
        opt.step()
        ref_opt.step()
        if step < 2:
            for name in PROJECTED:
                basis = opt.bases.entries[name]
                expected = before[name] - project(before[name] - ref_named[name].detach(), basis.U, basis.V)
                torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=0, atol=1e-6,
                                           msg=lambda m: f"{base} {name} step {step}: {m}")
            assert torch.equal(model.norm.weight, ref.norm.weight)  # unprojected params: the base's own step
    for name, leak in leaks(opt, start, model).items():
        assert leak <= LEAK_TOL, f"{base} {name}: leak {leak:.2e}"


def test_wrapper_behaves_like_an_optimizer():
    model = make()
    base = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)  # names from the base's param_names
    opt = OffPrincipalOptimizer(base, top_k=4, **adamw())
    assert set(opt.bases.entries) == set(PROJECTED) and isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        random_grads(model, gen)
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * 0.5**3)
    random_grads(model, gen)
    base.step()  # through the base optimizer directly: the hooks still project
    assert max(leaks(opt, before, model).values()) <= LEAK_TOL
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert set(roundtrip(opt.state_dict())) == {"state", "param_groups", "offprincipal"}
    opt.remove()
    before = snapshot(model)
    random_grads(model, gen)
    opt.step()
    assert max(leaks(opt, before, model).values()) > 1e-3  # unprojected again
