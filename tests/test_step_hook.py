"""Importing offprincipal has no side effect on torch.optim; the adapter's step hook keeps the factor cache fresh."""

import subprocess
import sys
import textwrap

import torch
from peft import get_peft_model

from offprincipal import OffPrincipalConfig
from offprincipal.tuner import OffPrincipalLayer
from conftest import make_tiny_model, tiny_batch


def test_import_registers_no_optimizer_hook_and_first_layer_registers_one():
    """In a fresh interpreter: ``import offprincipal`` leaves torch's global step hooks as they were; the first
    OffPrincipal layer registers exactly one, and further adapters do not add more."""
    script = textwrap.dedent(
        """
        import torch.optim.optimizer as O
        before = (dict(O._global_optimizer_pre_hooks), dict(O._global_optimizer_post_hooks))
        import offprincipal
        after = (dict(O._global_optimizer_pre_hooks), dict(O._global_optimizer_post_hooks))
        assert after == before, f"import offprincipal registered optimizer hooks: {before} -> {after}"
        from peft import get_peft_model
        from conftest import make_tiny_model
        cfg = dict(r=2, top_k=2, target_modules=["q_proj"])
        get_peft_model(make_tiny_model("llama"), offprincipal.OffPrincipalConfig(**cfg))
        hooks = list(O._global_optimizer_post_hooks.values())
        assert len(hooks) == len(before[1]) + 1 and hooks[-1].__name__ == "_drop_factor_caches", hooks
        get_peft_model(make_tiny_model("llama"), offprincipal.OffPrincipalConfig(**cfg))
        assert len(O._global_optimizer_post_hooks) == len(hooks), "a second adapter registered the hook again"
        print("ok")
        """
    )
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", script], cwd=tests_dir, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_cached_factors_refresh_after_a_fused_step_with_no_forward_in_between():
    """The step hook alone keeps the cache fresh: gradients are computed first, the factors are cached under
    no_grad, then a fused AdamW step (which does not bump version counters) changes A and B."""
    batch = tiny_batch()
    model = get_peft_model(make_tiny_model("llama"), OffPrincipalConfig(r=4, alpha=8, top_k=8, target_modules="all-linear"))
    layer = next(m for m in model.modules() if isinstance(m, OffPrincipalLayer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        versions = [p._version for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            stale = layer.effective_factors("default")  # cached after the backward, before the step
        opt.step()
        opt.zero_grad()
        assert [p._version for p in model.parameters() if p.requires_grad] == versions  # fused: no version bump
        weights = (layer.offprincipal_A["default"].weight, layer.offprincipal_B["default"].weight)
        with torch.no_grad():
            cached = layer.effective_factors("default")
            fresh = layer._project_factors(*weights, layer.offprincipal_U["default"], layer.offprincipal_V["default"])
        assert torch.equal(cached[0], fresh[0]) and torch.equal(cached[1], fresh[1])
        assert not torch.equal(cached[0], stale[0])  # the step moved A, and the cache followed
