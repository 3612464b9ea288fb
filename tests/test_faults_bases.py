"""Fault injection for the bases and the optimizers (issue 9, findings 3, 4, 6, 7, 11, 13, 14).

Every test reproduces a fault that was silent (or a crash) before the fix: damaged cache entries used as they
were, a foreign optimizer state adopted, added or duplicated parameters trained without their own projection,
one NaN spreading over a whole matrix, an unusable cache location crashing the run, a state of another shape
accepted until step().
"""

from __future__ import annotations

import io
import warnings
import logging
import struct

import pytest
import torch
from torch import nn

from offprincipal.optim import OffPrincipalAdamW, OffPrincipalOptimizer
from offprincipal.projection import principal_leak
from offprincipal import subspace as subspace_mod
from offprincipal.subspace import Subspace, SubspaceCache, compute_subspaces, fingerprint, top_k_subspace

pytestmark = pytest.mark.usefixtures("one_thread")

LEAK_TOL = 1e-5
CACHE_LOGGER = "offprincipal.subspace"


def certify(*args, **kwargs):
    """:func:`offprincipal.subspace.certify_subspace` (looked up at call time: the module may predate it)."""
    return subspace_mod.certify_subspace(*args, **kwargs)


class Tiny(nn.Module):
    def __init__(self, d=24, h=40, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, h, bias=True)
        self.down = nn.Linear(h, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw)


def train(model, opt, gen, steps):
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def spectral_weight(m=40, n=24, seed=0, dtype=torch.float32):
    """A weight with a clear spectrum (σ_i = 1/i), so 'top k' is unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=gen)).Q
    S = 1.0 / torch.arange(1, p + 1, dtype=torch.float32)
    return ((U * S) @ V.T).to(dtype)


def minor_bases(W, k):
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return Subspace(U[:, -k:].contiguous(), S[-k:].contiguous(), Vh[-k:].T.contiguous())


def same_subspace(a: Subspace, b: Subspace) -> bool:
    return torch.allclose(a.U @ a.U.T, b.U @ b.U.T, atol=1e-5) and torch.allclose(a.V @ a.V.T, b.V @ b.V.T, atol=1e-5)


# --- the certificate itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_certificate_accepts_fresh_bases_in_every_dtype_and_as_a_tuple(dtype):
    W = spectral_weight(dtype=dtype)
    sub = top_k_subspace(W, 4)
    certify(W, sub)
    certify(W, (sub.U, sub.V))  # S derived as diag(Uᵀ W V)
    certify(W, top_k_subspace(W, 4, "randomized"), sides="left")


def test_certificate_refuses_random_zeroed_nan_and_minor_bases():
    W = spectral_weight()
    good = top_k_subspace(W, 4)
    gen = torch.Generator().manual_seed(1)
    random = Subspace(torch.linalg.qr(torch.randn(40, 4, generator=gen)).Q, good.S,
                      torch.linalg.qr(torch.randn(24, 4, generator=gen)).Q)
    nan_U = good.U.clone()
    nan_U[3, 1] = float("nan")
    cases = {
        "random": (random, "not singular pairs"),
        "zeroed": (Subspace(torch.zeros_like(good.U), good.S, torch.zeros_like(good.V)), "not orthonormal"),
        "nan": (Subspace(nan_U, good.S, good.V), "non-finite"),
        "minor": (minor_bases(W, 4), "not its top 4"),
        "foreign": (top_k_subspace(spectral_weight(seed=5), 4), "not singular pairs"),
    }
    for label, (sub, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            certify(W, sub, name=label)


# --- finding 3: cache content ------------------------------------------------------------------------------------


def _rewrite_entry(path, U, S, V):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({"U": U.contiguous(), "S": S.contiguous(), "V": V.contiguous()}, str(path), metadata=meta)


def _flip_data_bytes(path):
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    start = 8 + header_len
    for i in range(start, start + 16):  # the first four fp32 entries of the first tensor: header intact
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["random", "zeroed", "nan", "flipped", "minor"])
def test_damaged_cache_entry_with_intact_header_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    W = spectral_weight()
    fresh = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    (path,) = tmp_path.rglob("*.safetensors")
    gen = torch.Generator().manual_seed(3)
    if damage == "random":
        _rewrite_entry(path, torch.linalg.qr(torch.randn(40, 4, generator=gen)).Q, fresh.S,
                       torch.linalg.qr(torch.randn(24, 4, generator=gen)).Q)
    elif damage == "zeroed":
        _rewrite_entry(path, torch.zeros(40, 4), fresh.S, torch.zeros(24, 4))
    elif damage == "nan":
        U = fresh.U.clone()
        U[5, 2] = float("nan")
        _rewrite_entry(path, U, fresh.S, fresh.V)
    elif damage == "minor":
        minor = minor_bases(W, 4)
        _rewrite_entry(path, minor.U, minor.S, minor.V)
    else:
        _flip_data_bytes(path)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        again = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    assert same_subspace(again, fresh), f"{damage} cache entry was used"
    assert torch.isfinite(again.U).all() and torch.isfinite(again.V).all()
    assert any(str(path) in r.getMessage() for r in caplog.records), "the warning must name the file"
    certify(W, SubspaceCache(tmp_path).load(fingerprint(W), (40, 24), 4, "exact", "cpu"))  # rewritten


# --- finding 4: foreign optimizer state, crafted fingerprints -----------------------------------------------------


def test_foreign_optimizer_state_is_refused_with_what_does_not_match():
    model_a, model_b = make(seed=0), make(seed=1)
    opt_a = OffPrincipalAdamW(model_a.named_parameters(), lr=1e-2, top_k=4, progress=False)
    train(model_a, opt_a, torch.Generator().manual_seed(0), 2)
    opt_b = OffPrincipalAdamW(model_b.named_parameters(), lr=1e-2, top_k=4, progress=False)
    before = {name: opt_b.bases.entries[name].U.clone() for name in opt_b.bases}
    with pytest.raises(ValueError, match="not singular pairs"):
        opt_b.load_state_dict(roundtrip(opt_a.state_dict()))
    for name, U in before.items():
        assert torch.equal(opt_b.bases.entries[name].U, U), "a refused state must leave the bases as they were"


def test_crafted_fingerprint_never_reads_outside_the_cache(tmp_path):
    cache_dir = tmp_path / "a" / "b" / "cache"
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, cache_dir=cache_dir, progress=False)
    sd = roundtrip(opt.state_dict())
    crafted = "../../../evil/x"
    # a safetensors file where an unchecked fingerprint would lead: bases of another model, header matching
    foreign = top_k_subspace(make(seed=7).up.weight, 4)
    outside = SubspaceCache(cache_dir)
    target = outside.directory / crafted[:2] / f"{crafted}-exact-k4.safetensors"
    target.resolve().parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"U": foreign.U, "S": foreign.S, "V": foreign.V}, str(target.resolve()),
              metadata={"fingerprint": crafted, "method": "exact", "version": "1", "shape": "(40, 24)"})
    sd["offprincipal"]["bases"]["up.weight"]["fingerprint"] = crafted
    U = opt.bases.entries["up.weight"].U.clone()
    with pytest.raises(ValueError, match="not a weight fingerprint"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.bases.entries["up.weight"].U, U)
    with pytest.raises(ValueError, match="not a weight fingerprint"):
        outside.path(crafted, 4, "exact")
    with pytest.raises(ValueError, match="method tag"):
        outside.path("0" * 32, 4, "exact/../../x")


def test_user_given_bases_are_certified():
    model = make()
    gen = torch.Generator().manual_seed(2)
    U, V = torch.linalg.qr(torch.randn(40, 3, generator=gen)).Q, torch.linalg.qr(torch.randn(24, 3, generator=gen)).Q
    with pytest.raises(ValueError, match="subspaces="):
        OffPrincipalAdamW(model.named_parameters(), subspaces={"up.weight": (U, V)}, progress=False)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="subspaces="):
        OffPrincipalOptimizer(base, model.named_parameters(), subspaces={"up.weight": (U, V)}, progress=False)


# --- finding 6: add_param_group ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adamw", "wrapper"])
def test_add_param_group_projects_named_weights_and_refuses_unnamed_ones(kind):
    model = make()
    others = [(n, p) for n, p in model.named_parameters() if n != "down.weight"]
    if kind == "adamw":
        opt = OffPrincipalAdamW(others, lr=1e-2, top_k=4, progress=False)
    else:
        base = torch.optim.SGD([p for _, p in others], lr=0.1, momentum=0.9)
        opt = OffPrincipalOptimizer(base, model.named_parameters(), top_k=4, progress=False)
    assert "down.weight" not in opt.bases
    with pytest.raises(ValueError, match="names"):
        opt.add_param_group({"params": [model.down.weight]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("down.weight", model.down.weight)], "weight_decay": 0.0})
    assert "down.weight" in opt.bases and opt.bases.entries["down.weight"].U.shape == (24, 4)
    before = model.down.weight.detach().clone()
    train(model, opt, torch.Generator().manual_seed(0), 5)
    left, right = principal_leak(model.down.weight.detach() - before, *opt.bases["down.weight"])
    assert max(left, right) <= LEAK_TOL


# --- finding 7: duplicate names ----------------------------------------------------------------------------------


def test_duplicate_parameter_names_are_refused():
    model = make()
    with pytest.raises(ValueError, match="more than once"):
        OffPrincipalAdamW([("w", model.up.weight), ("w", model.down.weight)], top_k=4, progress=False)
    base = torch.optim.SGD([model.up.weight, model.down.weight], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        OffPrincipalOptimizer(base, [("w", model.up.weight), ("w", model.down.weight)], top_k=4, progress=False)
    opt = OffPrincipalAdamW([("up.weight", model.up.weight)], top_k=4, progress=False)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [("up.weight", model.down.weight)]})


# --- finding 11: non-finite gradients ----------------------------------------------------------------------------


def test_one_nan_gradient_entry_skips_that_matrix_step_with_a_warning():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, progress=False)
    gen = torch.Generator().manual_seed(0)
    train(model, opt, gen, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: v.clone() for k, v in opt.state[model.up.weight].items()}
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    model.up.weight.grad[3, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="up.weight"):
        opt.step()
    assert torch.equal(model.up.weight, before["up.weight"])
    for key, value in moments.items():
        assert torch.equal(opt.state[model.up.weight][key], value), key
    assert not torch.equal(model.down.weight, before["down.weight"]), "other weights still step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_skipped_matrix_leaves_the_other_matrices_steps_bit_identical():
    """The device-side skip selects per matrix: the other projected and the plain parameters step exactly as in
    a run where the skipped matrix had no gradient at all."""
    runs = []
    for poison in (True, False):
        model = make()
        opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, progress=False)
        gen = torch.Generator().manual_seed(0)
        train(model, opt, gen, 2)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if poison:
            model.up.weight.grad[3, 5] = float("inf")
            with pytest.warns(RuntimeWarning, match="up.weight"):
                opt.step()
        else:
            model.up.weight.grad = None
            opt.step()
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if name != "up.weight":
            for key, value in opt_a.state[p].items():
                assert torch.equal(value, opt_b.state[q][key]), (name, key)
    assert torch.equal(opt_a.state[a.up.weight]["step"], torch.tensor(2.0))


SYNCS = ("item", "tolist", "__bool__", "__float__", "cpu")


def _forbid_host_syncs(monkeypatch):
    def forbidden(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"step() called Tensor.{name}")
        return raiser

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


@pytest.mark.parametrize("report", ["next_step", "report_nonfinite"])
def test_deferred_nonfinite_report_has_no_host_sync_in_step(monkeypatch, report):
    """With the deferred report forced (as on CUDA), step() reads nothing back from the tensors (every host-read
    method raises during it), still skips the poisoned matrix, and the warning appears at the beginning of the
    next step() or at report_nonfinite(). Only projected weights get gradients here: torch's own (non-capturable)
    AdamW code for plain parameters reads its step count with .item()."""
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, progress=False)
    opt._defer_nonfinite = True
    gen = torch.Generator().manual_seed(0)
    projected = [model.up.weight, model.down.weight]

    def grads(nan):
        for p in projected:
            p.grad = torch.randn(p.shape, generator=gen)
        if nan:
            model.up.weight.grad[3, 5] = float("nan")

    grads(False)
    opt.step()
    before = model.up.weight.detach().clone()
    moments = {k: v.clone() for k, v in opt.state[model.up.weight].items()}
    down_before = model.down.weight.detach().clone()
    grads(True)
    with monkeypatch.context() as patch:
        _forbid_host_syncs(patch)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.step()
        assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], "the report is deferred"
        assert torch.equal(model.up.weight, before)
        for key, value in moments.items():
            assert torch.equal(opt.state[model.up.weight][key], value), key
        assert not torch.equal(model.down.weight, down_before), "the other matrix steps"
        if report == "next_step":
            grads(False)
            with pytest.warns(RuntimeWarning, match="up.weight"):
                opt.step()
            assert not torch.equal(model.up.weight, before), "a finite gradient steps again"
    if report == "report_nonfinite":
        with pytest.warns(RuntimeWarning, match="up.weight"):
            assert opt.report_nonfinite() == ["up.weight"]
    assert opt.report_nonfinite() == [], "each skip is reported once"


def test_nonfinite_on_cpu_warns_during_the_step():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, progress=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.down.weight.grad[0, 0] = float("-inf")
    with pytest.warns(RuntimeWarning, match="down.weight"):
        opt.step()
    assert opt.report_nonfinite() == [], "already reported"
    assert torch.equal(opt.state[model.down.weight]["step"], torch.tensor(0.0))
    assert torch.equal(opt.state[model.up.weight]["step"], torch.tensor(1.0))


def test_wrapper_restores_a_matrix_whose_update_is_not_finite():
    model = make()
    opt = OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), top_k=4,
                                progress=False)
    before = model.up.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.up.weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="up.weight"):
        opt.step()
    assert torch.equal(model.up.weight, before)
    assert torch.isfinite(model.down.weight).all()


# --- finding 13: unusable cache location -------------------------------------------------------------------------


def _cache_warnings(caplog):
    return [r for r in caplog.records if "cannot be written" in r.getMessage()]


def test_cache_dir_that_is_a_file_gives_one_warning_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a user's file")
    weights = {f"w{i}": spectral_weight(seed=i) for i in range(3)}
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        subs = compute_subspaces(weights, 4, cache_dir=blocker, progress=False)
    assert set(subs) == set(weights) and len(_cache_warnings(caplog)) == 1
    assert blocker.read_text() == "a user's file"


def test_cache_entry_path_that_is_a_folder_leaves_no_temp_file(tmp_path, caplog):
    W = spectral_weight()
    cache = SubspaceCache(tmp_path)
    cache.path(fingerprint(W), 4, "exact").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        sub = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    certify(W, sub)
    assert len(_cache_warnings(caplog)) == 1
    assert [p for p in tmp_path.rglob("*") if "tmp" in p.name] == []


def test_get_peft_model_with_an_unusable_cache_runs_uncached(tmp_path, caplog):
    from peft import get_peft_model

    import offprincipal
    from conftest import make_tiny_model

    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    config = offprincipal.OffPrincipalConfig(r=2, top_k=4, target_modules=["q_proj", "v_proj"],
                                             subspace_cache_dir=str(blocker))
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        model = get_peft_model(make_tiny_model(), config)
    assert model is not None and len(_cache_warnings(caplog)) == 1


# --- issue 17, finding 9: a cache on a full disk -----------------------------------------------------------------

ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture
def full_disk(monkeypatch):
    """Every subspace cache write fails as safetensors' writer fails on a full disk: a SafetensorError (not an
    OSError) after the file was opened (a partial temporary file is left for the cache to remove)."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 8)
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(subspace_mod, "save_file", save_file)


def test_get_peft_model_on_a_full_disk_gives_one_warning_and_runs_uncached(tmp_path, caplog, full_disk):
    """Before: get_peft_model died with SafetensorError. Now: one warning, the same bases as without a cache,
    no file left in the cache folder."""
    from peft import get_peft_model

    import offprincipal
    from conftest import make_tiny_model

    def build(cache):
        config = offprincipal.OffPrincipalConfig(r=2, top_k=4, target_modules=["q_proj", "v_proj"],
                                                 subspace_cache_dir=cache)
        torch.manual_seed(0)
        return get_peft_model(make_tiny_model(), config)

    with caplog.at_level(logging.WARNING):
        model = build(str(tmp_path / "cache"))
    warned = _cache_warnings(caplog)
    assert len(warned) == 1 and "SafetensorError" in warned[0].getMessage() and "No space left" in warned[0].getMessage()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    reference = dict(build(False).named_modules())
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "offprincipal_U")]
    assert layers and all(
        torch.equal(m.offprincipal_U["default"], reference[name].offprincipal_U["default"])
        and torch.equal(m.offprincipal_V["default"], reference[name].offprincipal_V["default"]) for name, m in layers
    )


def test_optimizer_on_a_full_disk_gives_one_warning_and_runs_uncached(tmp_path, caplog, full_disk):
    model = make()
    with caplog.at_level(logging.WARNING):
        opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, progress=False, cache_dir=tmp_path / "cache")
    assert len(_cache_warnings(caplog)) == 1
    train(model, opt, torch.Generator().manual_seed(0), 2)
    reference = make()
    opt_ref = OffPrincipalAdamW(reference.named_parameters(), top_k=4, progress=False, cache_dir=False)
    train(reference, opt_ref, torch.Generator().manual_seed(0), 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


FILE_SIZE_LIMIT = """
import logging, resource, signal, sys
import torch
from offprincipal.subspace import compute_subspaces
torch.manual_seed(0)
weights = {f"w{i}": torch.randn(64, 48) for i in range(3)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
subs = compute_subspaces(weights, 4, cache_dir=sys.argv[1], progress=False)
print(sorted(subs), flush=True)
"""


def test_cache_write_refused_by_the_kernel_gives_one_warning(tmp_path):
    """The real writer, failing in the kernel: a file-size limit (RLIMIT_FSIZE) makes safetensors' write fail
    (EFBIG) as a full disk does (ENOSPC; no small full filesystem can be mounted in a test). Before: the process
    died with SafetensorError."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "['w0', 'w1', 'w2']"
    lines = [line for line in out.stderr.splitlines() if "cannot be written" in line]
    assert len(lines) == 1 and "File too large" in lines[0], out.stderr[-3000:]
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# --- finding 14: a state for other shapes ------------------------------------------------------------------------


def test_state_of_another_shape_is_refused_at_load_state_dict():
    small, large = make(h=40), make(h=44)
    opt_small = OffPrincipalAdamW(small.named_parameters(), top_k=4, progress=False)
    train(small, opt_small, torch.Generator().manual_seed(0), 1)
    sd = roundtrip(opt_small.state_dict())
    opt_large = OffPrincipalAdamW(large.named_parameters(), top_k=4, progress=False)
    with pytest.raises(ValueError, match="shape"):
        opt_large.load_state_dict(sd)
    assert not opt_large.state, "nothing is loaded from a refused state"
    sd_plain = {k: v for k, v in sd.items() if k != "offprincipal"}
    with pytest.raises(ValueError, match="shape"):
        opt_large.load_state_dict(sd_plain)
    wrapped = OffPrincipalOptimizer(torch.optim.AdamW(large.parameters()), large.named_parameters(), top_k=4,
                                    progress=False)
    with pytest.raises(ValueError, match="shape"):
        wrapped.load_state_dict(sd)


def test_state_with_other_parameter_names_is_refused():
    model = make()
    opt = OffPrincipalAdamW(model.named_parameters(), top_k=4, progress=False)
    train(model, opt, torch.Generator().manual_seed(0), 1)
    sd = roundtrip(opt.state_dict())
    sd["param_groups"][0]["param_names"] = list(reversed(sd["param_groups"][0]["param_names"]))
    with pytest.raises(ValueError, match="names parameter"):
        OffPrincipalAdamW(model.named_parameters(), top_k=4, progress=False).load_state_dict(sd)


# --- issue 17, findings 1 and 2: "top-k" means top-k; bf16 pairs at bf16's rounding ------------------------------


def planted_spectrum(m, n, sigma, seed=0):
    """W = Q1 diag(sigma) Q2ᵀ (fp32) with the given singular values (fp64 construction)."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    return ((Q1 * sigma.double()) @ Q2.T).float()


def pairs(W, idx):
    """The singular pairs ``idx`` (list of indices) of W, as a Subspace (genuine pairs, chosen freely)."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    idx = torch.tensor(idx)
    return Subspace(U[:, idx].contiguous(), S[idx].contiguous(), Vh[idx].T.contiguous())


def test_gaussian_directions_65_to_96_are_not_its_top_32():
    W = torch.randn(512, 384, generator=torch.Generator().manual_seed(0))
    certify(W, top_k_subspace(W, 32))
    with pytest.raises(ValueError, match="not its top 32"):
        certify(W, pairs(W, list(range(64, 96))))


@pytest.mark.parametrize("swapped", [1, 3, 10])
def test_last_pairs_swapped_for_the_next_ones_are_refused_at_a_small_gap(swapped):
    """The k-th pair swapped for the (k+1)-th (and the last few for the next few) at σ_i/σ_{i+1} = 1.0015, the
    smallest gap seen on SmolLM2's σ₃₂/σ₃₃: refused; the true top k passes."""
    k, p = 32, 120
    sigma = 1.0015 ** -torch.arange(p, dtype=torch.float64) * 3.0
    W = planted_spectrum(200, p, sigma, seed=1)
    certify(W, pairs(W, list(range(k))))
    idx = list(range(k - swapped)) + list(range(k, k + swapped))
    with pytest.raises(ValueError, match="not its top 32"):
        certify(W, pairs(W, idx))


def test_exactly_tied_pairs_any_basis_of_the_tie_is_top_k():
    """σ_k = σ_{k+1}: every basis of the tied pair is equally 'top k' (within the tie tolerance), so a rotation
    mixing the k-th and (k+1)-th pairs passes, and so does the (k+1)-th in place of the k-th."""
    k = 8
    sigma = torch.cat([torch.linspace(4, 2, k), torch.tensor([2.0]), torch.linspace(1.5, 0.1, 31)]).double()
    W = planted_spectrum(60, 40, sigma, seed=2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    c, s = 0.6, 0.8
    Ur, Vr = U[:, :k + 1].clone(), Vh[:k + 1].T.clone()
    Ur[:, k - 1], Vr[:, k - 1] = c * U[:, k - 1] + s * U[:, k], c * Vh[k - 1] + s * Vh[k]
    certify(W, (Ur[:, :k].contiguous(), Vr[:, :k].contiguous()))
    certify(W, pairs(W, list(range(k - 1)) + [k]))
    assert subspace_mod.CERTIFY_TIE_TOL <= 1e-3


def bf16_spectral(seed, m=96, n=64):
    sigma = torch.linspace(3, 0.2, min(m, n)).double()
    return planted_spectrum(m, n, sigma, seed=seed).to(torch.bfloat16)


@pytest.mark.parametrize("away", [0.01, 0.03, 0.06])
def test_bf16_weight_refuses_the_bases_of_a_weight_1_to_6_percent_away(away):
    W = bf16_spectral(3)
    g = torch.Generator().manual_seed(4)
    other = (W.float() + away * W.float().std() * torch.randn(W.shape, generator=g)).to(torch.bfloat16)
    certify(W, top_k_subspace(W, 8))
    with pytest.raises(ValueError, match="not singular pairs"):
        certify(W, top_k_subspace(other, 8))


def test_bf16_genuine_training_with_one_rounding_passes():
    """Off-principal training of a bf16 weight with fp32 master weights stores round_bf16(W0 + ΔW): the pairs of W0
    hold up to one rounding of W (≈ 2⁻⁹ relative per entry), whatever the size of ΔW against the rounding."""
    W0 = bf16_spectral(5)
    sub = top_k_subspace(W0, 8)
    g = torch.Generator().manual_seed(6)
    for size in (1e-4, 1e-2, 3e-2):  # ‖ΔW‖₂ up to ≈ 0.2·S_k
        D = torch.randn(W0.shape, generator=g) * size
        D = D - sub.U @ (sub.U.T @ D)
        D = D - (D @ sub.V) @ sub.V.T
        certify((W0.float() + D).to(torch.bfloat16), sub, topk_tol=subspace_mod.CERTIFY_TIE_TOL + trained_allowance())


def trained_allowance():
    from offprincipal.optim.bases import TRAINED_TOPK_TOL

    return TRAINED_TOPK_TOL


@pytest.mark.parametrize("away", [0.005, 0.05])
def test_bf16_optimizer_state_from_a_model_half_to_5_percent_different_is_refused(away):
    model_a = make().to(torch.bfloat16)
    model_b = make().to(torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_((away * p.float().std() * torch.randn(p.shape, generator=g)).to(p.dtype))
    opt_a = OffPrincipalAdamW(model_a.named_parameters(), lr=1e-3, top_k=4, master_weights=True, progress=False)
    train(model_a, opt_a, torch.Generator().manual_seed(0), 2)
    opt_b = OffPrincipalAdamW(model_b.named_parameters(), lr=1e-3, top_k=4, master_weights=True, progress=False)
    with pytest.raises(ValueError, match="not singular pairs"):
        opt_b.load_state_dict(roundtrip(opt_a.state_dict()))


def test_bf16_genuine_resume_with_master_weights_passes():
    model = make().to(torch.bfloat16)
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, master_weights=True, progress=False)
    train(model, opt, torch.Generator().manual_seed(0), 6)
    resumed = make(seed=3).to(torch.bfloat16)
    resumed.load_state_dict(roundtrip(model.state_dict()))
    opt2 = OffPrincipalAdamW(resumed.named_parameters(), lr=1e-2, top_k=4, master_weights=True, progress=False)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for name in opt.bases:
        assert torch.equal(opt2.bases.entries[name].U, opt.bases.entries[name].U)
