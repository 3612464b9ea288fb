"""ProjectionOptions: defaults in one place, validation once (naming the field), frozen, and the same options
whether a consumer gets ``options=`` or keywords."""

from __future__ import annotations

import dataclasses
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from offprincipal import OffPrincipalConfig, ProjectionOptions
from offprincipal.optim import OffPrincipalAdamW, OffPrincipalOptimizer
from offprincipal.options import (
    DEFAULT_BACKEND,
    DEFAULT_EXCLUDE,
    DEFAULT_SIDES,
    DEFAULT_SVD_METHOD,
    DEFAULT_TOP_K,
    OptionError,
    OptionTypeError,
)
from offprincipal.trainer import OffPrincipalCallback, OffPrincipalTrainerMixin, offprincipal_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(30, 12)
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12, bias=False)


def make(seed=0):
    torch.manual_seed(seed)
    return Tiny()


FAST = dict(cache_dir=False, progress=False)


# --- the spec ------------------------------------------------------------------------------------------------------


def test_defaults_live_in_options():
    from offprincipal._sides import DEFAULT_PRECISION

    o = ProjectionOptions()
    assert (o.top_k, o.top_k_pattern, o.sides, o.exclude) == (DEFAULT_TOP_K, (), DEFAULT_SIDES, DEFAULT_EXCLUDE)
    assert (o.svd_method, o.cache_dir, o.backend, o.precision, o.progress) == (
        DEFAULT_SVD_METHOD, None, DEFAULT_BACKEND, DEFAULT_PRECISION, True)
    assert (DEFAULT_TOP_K, DEFAULT_SIDES, DEFAULT_SVD_METHOD, DEFAULT_BACKEND) == (32, "both", "exact", "auto")
    assert DEFAULT_EXCLUDE == ("embed", "lm_head", "wte", "wpe")
    config = OffPrincipalConfig()
    assert (config.top_k, config.sides, config.svd_method) == (DEFAULT_TOP_K, DEFAULT_SIDES, DEFAULT_SVD_METHOD)
    assert OffPrincipalCallback().options == o


def test_cli_top_k_default_is_the_constant():
    from offprincipal.cli import build_parser

    parser = build_parser()
    for command in ("train", "demo"):
        sub = next(a for a in parser._subparsers._group_actions if command in a.choices).choices[command]
        assert sub.get_default("top_k") == DEFAULT_TOP_K


BAD = [
    ("top_k", 0, OptionError, r"ProjectionOptions\.top_k must be ≥ 1"),
    ("top_k", -3, OptionError, r"top_k must be ≥ 1"),
    ("top_k", 1.0, OptionError, r"top_k is a float.*\(0, 1\)"),
    ("top_k", 0.0, OptionError, r"top_k is a float"),
    ("top_k", True, OptionTypeError, r"top_k must be an int"),
    ("top_k", "32", OptionTypeError, r"top_k must be an int"),
    ("top_k_pattern", {"down": 0}, OptionError, r"top_k_pattern\['down'\] must be ≥ 1"),
    ("top_k_pattern", {"down": 1.5}, OptionError, r"top_k_pattern\['down'\] is a float"),
    ("top_k_pattern", {"(": 3}, OptionError, r"top_k_pattern is not a valid regex"),
    ("top_k_pattern", {3: 3}, OptionTypeError, r"top_k_pattern must be a regex"),
    ("top_k_pattern", "down=3", OptionTypeError, r"top_k_pattern must be a dict"),
    ("sides", "top", OptionError, r"sides must be one of \('both', 'left', 'right'\), got 'top'"),
    ("exclude", "embed", OptionTypeError, r"exclude must be a tuple or list of regexes.*\('embed',\)"),
    ("exclude", None, OptionTypeError, r"exclude must be a tuple or list.*\(\) excludes nothing"),
    ("exclude", ("ok", "[unclosed"), OptionError, r"exclude is not a valid regex: '\[unclosed'"),
    ("exclude", ("ok", 3), OptionTypeError, r"exclude must be a regex"),
    ("svd_method", "lanczos", OptionError, r"svd_method must be one of \('exact', 'randomized'\)"),
    ("cache_dir", 3, OptionTypeError, r"cache_dir must be a folder"),
    ("backend", "cuda", OptionError, r"backend must be one of"),
    ("precision", "fp16", OptionError, r"precision must be one of"),
    ("progress", "yes", OptionTypeError, r"progress must be True or False"),
]


@pytest.mark.parametrize("field,value,error,match", BAD, ids=[f"{f}={v!r}" for f, v, _, _ in BAD])
def test_each_field_is_validated(field, value, error, match):
    with pytest.raises(error, match=match):
        ProjectionOptions(**{field: value})
    base_class = TypeError if error is OptionTypeError else ValueError
    with pytest.raises(base_class, match=rf"OffPrincipalAdamW\.{field}"):  # consumers name themselves
        OffPrincipalAdamW(make().named_parameters(), **{field: value})


def test_accepted_forms_are_normalised():
    o = ProjectionOptions(top_k=0.25, top_k_pattern={"up": 3, r"do.*": 0.5}, exclude=["embed", r"lm_head$"],
                         cache_dir=False, sides="left")
    assert o.top_k_pattern == (("up", 3), (r"do.*", 0.5))  # the order given: the first match wins
    assert o.exclude == ("embed", r"lm_head$")
    assert ProjectionOptions(top_k_pattern=[("up", 3)]) == ProjectionOptions(top_k_pattern={"up": 3})
    assert ProjectionOptions(top_k_pattern=None).top_k_pattern == ()
    assert ProjectionOptions(exclude=()).exclude == ()
    assert ProjectionOptions(cache_dir="/tmp/x").cache_dir == "/tmp/x"


def test_frozen_hashable_picklable():
    o = ProjectionOptions(top_k=4, top_k_pattern={"up": 3}, exclude=["embed"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.top_k = 8
    assert hash(o) == hash(ProjectionOptions(top_k=4, top_k_pattern={"up": 3}, exclude=("embed",)))
    assert {o: 1}[ProjectionOptions(top_k=4, top_k_pattern=[("up", 3)], exclude=("embed",))] == 1
    assert pickle.loads(pickle.dumps(o)) == o


def test_resolve_merges_and_names_unknown_keywords():
    base = ProjectionOptions(top_k=4, sides="left", exclude=())
    merged = ProjectionOptions.resolve("X", base, {"top_k": 6})
    assert merged == dataclasses.replace(base, top_k=6) and merged.sides == "left" and merged.exclude == ()
    assert ProjectionOptions.resolve("X") == ProjectionOptions()
    assert ProjectionOptions.resolve("X", base) == base
    with pytest.raises(TypeError, match=r"X got unexpected keyword argument\(s\) \['topk'\].*top_k"):
        ProjectionOptions.resolve("X", None, {"topk": 4})
    with pytest.raises(TypeError, match="options must be a ProjectionOptions"):
        ProjectionOptions.resolve("X", {"top_k": 4})
    with pytest.raises(ValueError, match=r"^X\.sides must be one of"):
        ProjectionOptions.resolve("X", base, {"sides": "up"})
    with pytest.raises(TypeError, match=r"^Cfg\.subspace_cache_dir must be a folder"):
        ProjectionOptions.resolve("Cfg", None, {"cache_dir": 1.5}, aliases={"cache_dir": "subspace_cache_dir"})


# --- the consumers -------------------------------------------------------------------------------------------------


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _same_run(make_opt_a, make_opt_b, steps=3):
    """Two optimizers over two copies of one model: the same bases, and the same weights after ``steps`` steps."""
    models, opts = [make(), make()], []
    for model, make_opt in zip(models, (make_opt_a, make_opt_b)):
        opts.append(make_opt(model))
    a, b = opts
    assert list(a.bases) == list(b.bases) == ["up.weight", "down.weight"]
    for name in a.bases:
        assert all(torch.equal(x, y) for x, y in zip(a.bases[name], b.bases[name]))
    for step in range(steps):
        for model, opt in zip(models, opts):
            _grads(model, step)
            opt.step()
    for (n, p), (_, q) in zip(*(m.named_parameters() for m in models)):
        assert torch.equal(p, q), n
    return a, b


def test_adamw_options_equal_keywords():
    o = ProjectionOptions(top_k=3, top_k_pattern={r"down\.weight": 2}, sides="left", **FAST)
    a, b = _same_run(
        lambda m: OffPrincipalAdamW(m.named_parameters(), lr=1e-2, options=o),
        lambda m: OffPrincipalAdamW(m.named_parameters(), lr=1e-2, top_k=3, top_k_pattern={r"down\.weight": 2}, sides="left",
                                    **FAST),
    )
    assert a.options == b.options == o and a.sides == "left" and a.bases["down.weight"][0].shape[1] == 2
    # keywords replace fields of options=
    c = OffPrincipalAdamW(make().named_parameters(), options=o, sides="right", top_k_pattern={})
    assert c.options == dataclasses.replace(o, sides="right", top_k_pattern=()) and c.sides == "right"
    assert c.bases["down.weight"][0].shape[1] == 3
    assert c.state_dict()["offprincipal"]["sides"] == "right"


def test_optimizer_wrapper_options_equal_keywords():
    o = ProjectionOptions(top_k=4, sides="right", exclude=("embed", "down"), **FAST)

    def wrapped(model, **kw):
        return OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     model.named_parameters(), **kw)

    models, opts = [make(), make()], []
    opts = [wrapped(models[0], options=o), wrapped(models[1], top_k=4, sides="right", exclude=["embed", "down"], **FAST)]
    assert opts[0].options == opts[1].options == o and list(opts[0].bases) == ["up.weight"]
    assert all(torch.equal(x, y) for x, y in zip(opts[0].bases["up.weight"], opts[1].bases["up.weight"]))
    for step in range(2):
        for model, opt in zip(models, opts):
            _grads(model, step)
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_unknown_keywords_are_refused_by_name():
    model = make()
    with pytest.raises(TypeError, match=r"OffPrincipalAdamW got unexpected keyword argument\(s\) \['topk'\]"):
        OffPrincipalAdamW(model.named_parameters(), topk=4)
    with pytest.raises(TypeError, match=r"OffPrincipalOptimizer got unexpected keyword argument\(s\) \['side'\]"):
        OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), side="left")
    with pytest.raises(TypeError, match=r"OffPrincipalCallback got unexpected keyword argument\(s\) \['svd'\]"):
        OffPrincipalCallback(svd="exact")
    with pytest.raises(TypeError, match=r"unknown OffPrincipalAdamW option\(s\) \['momentum'\]"):
        offprincipal_trainer(object, momentum=0.9)


def test_options_are_validated_before_any_basis_or_collective(monkeypatch):
    """A bad value raises at construction on every rank, before a basis is computed or a collective is entered."""
    import offprincipal.optim as optim

    def unreachable(*args, **kwargs):
        raise AssertionError("bases were computed before the options were validated")

    monkeypatch.setattr(optim.PrincipalBases, "build", unreachable)
    monkeypatch.setattr(optim.bases, "broadcast_bases", unreachable)
    model = make()
    with pytest.raises(ValueError, match=r"OffPrincipalAdamW\.svd_method"):
        OffPrincipalAdamW(model.named_parameters(), svd_method="svds")
    with pytest.raises(ValueError, match=r"OffPrincipalOptimizer\.svd_method"):
        OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), svd_method="x")
    with pytest.raises(ValueError, match=r"OffPrincipalCallback\.svd_method"):
        OffPrincipalCallback(svd_method="x")
    with pytest.raises(ValueError, match=r"OffPrincipalTrainer\.svd_method"):
        offprincipal_trainer(type("Trainer", (), {}), svd_method="x")


def _train_begin(callback, model, inner):
    args, state = SimpleNamespace(deepspeed=None, output_dir="unused"), SimpleNamespace(global_step=0)
    callback.on_train_begin(args, state, SimpleNamespace(), model=model, optimizer=inner)
    return callback.optimizer


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_callback_options_equal_keywords(base):
    o = ProjectionOptions(top_k=3, sides="left", **FAST)
    callbacks = [OffPrincipalCallback(options=o, log_every=0), OffPrincipalCallback(3, sides="left", log_every=0, **FAST)]
    assert callbacks[0].options == callbacks[1].options == o
    assert OffPrincipalCallback(options=o, top_k=5).options == dataclasses.replace(o, top_k=5)

    def make_opt(callback):
        def build(model):
            inner = (torch.optim.AdamW(model.parameters(), lr=1e-2) if base == "adamw"
                     else torch.optim.SGD(model.parameters(), lr=0.1))
            opt = _train_begin(callback, model, inner)
            assert isinstance(opt, OffPrincipalAdamW if base == "adamw" else OffPrincipalOptimizer)
            assert opt.options == o
            return opt
        return build

    _same_run(make_opt(callbacks[0]), make_opt(callbacks[1]))


class _TrainerLike:
    """What ``create_optimizer`` reads from a Trainer."""

    def __init__(self, model):
        self.model, self.optimizer = model, None
        self.args = SimpleNamespace(weight_decay=0.1, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                                    adam_epsilon=1e-8)

    def get_decay_parameter_names(self, model):
        return [n for n, _ in model.named_parameters() if not n.endswith("bias")]


class _FakeTrainer(OffPrincipalTrainerMixin, _TrainerLike):
    pass


def test_mixin_takes_options_or_a_dict():
    o = ProjectionOptions(top_k=3, sides="right", **FAST)

    def with_options(value):
        def build(model):
            trainer = _FakeTrainer(model)
            trainer.offprincipal_options = value
            return trainer.create_optimizer()
        return build

    a, b = _same_run(with_options(o), with_options(dict(top_k=3, sides="right", master_weights=False, **FAST)))
    assert a.options == b.options == o
    c = with_options({"options": o, "top_k": 2})(make())
    assert c.options == dataclasses.replace(o, top_k=2)
    with pytest.raises(TypeError, match="offprincipal_options must be a ProjectionOptions or a dict"):
        with_options(["top_k", 3])(make())


def test_offprincipal_trainer_resolves_its_options_once():
    o = ProjectionOptions(top_k=3, **FAST)
    cls = offprincipal_trainer(_TrainerLike, top_k=3, master_weights=True, **FAST)
    assert cls.offprincipal_options == {"master_weights": True, "options": o}
    assert offprincipal_trainer(_TrainerLike, options=o).offprincipal_options == {"options": o}
    opt = cls(make()).create_optimizer()
    assert opt.options == o and opt.master_weights is True


def test_config_validates_shared_fields_through_the_options():
    config = OffPrincipalConfig(top_k=4, top_k_pattern={"down_proj": 2}, sides="left", svd_method="randomized",
                                subspace_cache_dir="/tmp/cache")
    assert config.top_k_pattern == {"down_proj": 2}  # still a plain, JSON-serialisable dict
    assert config.projection_options() == ProjectionOptions(
        top_k=4, top_k_pattern={"down_proj": 2}, sides="left", svd_method="randomized", cache_dir="/tmp/cache")
    for kw, match in [
        (dict(sides="up"), r"OffPrincipalConfig\.sides must be one of"),
        (dict(svd_method="qr"), r"OffPrincipalConfig\.svd_method must be one of"),
        (dict(top_k=0), r"OffPrincipalConfig\.top_k must be ≥ 1"),
        (dict(top_k=2.0), r"OffPrincipalConfig\.top_k is a float"),
        (dict(top_k_pattern={"q_proj": -1}), r"OffPrincipalConfig\.top_k_pattern\['q_proj'\] must be ≥ 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            OffPrincipalConfig(**kw)
    with pytest.raises(TypeError, match=r"OffPrincipalConfig\.top_k must be an int"):
        OffPrincipalConfig(top_k="8")
    with pytest.raises(TypeError, match=r"OffPrincipalConfig\.subspace_cache_dir must be a folder"):
        OffPrincipalConfig(subspace_cache_dir=7)
