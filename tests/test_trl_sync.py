"""TRL's weight sync to vLLM with an OffPrincipal adapter, up to the engine boundary (issue 16, findings 4 and 5).

vLLM cannot be installed on these machines (CUDA wheels, no GPU). So TRL's own sync code runs, and what it hands to
vLLM is recorded: the merged stream of ``VLLMGeneration._iter_named_params`` (GRPOTrainer), and the adapter folder
``AsyncGRPOTrainer._sync_weight_lora`` asks the server to load. Two stand-ins, nothing else: a recording
``VLLMClient`` (the HTTP client to the server) and TRL's CUDA peak-FLOPs probe, which ``AsyncGRPOTrainer.__init__``
calls and which needs a GPU.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

trl = pytest.importorskip("trl")
agt = pytest.importorskip("trl.experimental.async_grpo.async_grpo_trainer")
from datasets import Dataset  # noqa: E402

from offprincipal import OffPrincipalConfig  # noqa: E402
from offprincipal.integrations.trl import LoraSyncView, OffPrincipalAsyncGRPOTrainer, trl_weight_stream  # noqa: E402
from offprincipal.tuner import OffPrincipalLayer  # noqa: E402
from conftest import make_tiny_model, make_tokenizer, tiny_batch  # noqa: E402


def prompts(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(n)])


def reward(completions, **kw):
    return [float(len(c)) for c in completions]


def randomize_b(model, std=1e-2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "offprincipal_B" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, OffPrincipalLayer)}


# ------------------------------------------------------------ merged sync: GRPOTrainer's _iter_named_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_vllm_stream_sends_w0_plus_delta_and_restores_the_base_bit_for_bit(tmp_path, dtype, one_thread):
    trainer = trl.GRPOTrainer(
        model=make_tiny_model("llama", dtype=dtype), reward_funcs=reward, train_dataset=prompts(),
        processing_class=make_tokenizer(),
        args=trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=4, max_steps=1, use_cpu=True, bf16=False, report_to=[],
                            gradient_checkpointing=False, save_strategy="no"),
        peft_config=OffPrincipalConfig(r=4, top_k=8, target_modules="all-linear"),
    )
    model = trainer.model
    randomize_b(model, std=0.05)
    targeted = {n.removeprefix("base_model.model."): m for n, m in layers(model).items()}
    W0 = {n: m.get_base_layer().weight.detach().clone() for n, m in targeted.items()}
    expected = {n: (W0[n].float() + m.get_delta_weight("default").detach()).to(dtype) for n, m in targeted.items()}
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if "offprincipal_" not in n and "base_layer" not in n}
    for _ in range(3):  # three syncs
        sent = {name: tensor.detach().clone() for name, tensor in trl_weight_stream(model, trainer.accelerator)}
        assert not any("offprincipal" in name for name in sent)
        for n in targeted:
            # one rounding of W0 + ΔW (ΔW recomputed by row chunks: the same products; equal here, ≤ 1 ulp anywhere)
            torch.testing.assert_close(sent[f"{n}.weight"].float(), expected[n].float(), rtol=0,
                                       atol=float(expected[n].detach().float().abs().max()) * torch.finfo(dtype).eps)
        for n, p in plain.items():
            assert torch.equal(sent[n.removeprefix("base_model.model.")], p), n  # everything else is sent as is
        assert len(sent) == len(targeted) + len(plain)
        for n, m in targeted.items():
            assert torch.equal(m.get_base_layer().weight.view(torch.uint8), W0[n].view(torch.uint8)), n


# ------------------------------------------------------------ adapter-only sync: AsyncGRPOTrainer


class RecordingVLLMClient:
    """Stand-in for trl's async VLLMClient: records what the trainer asks the server to do."""

    server_info = {"lora_config": {"max_lora_rank": 16, "max_loras": 8}, "parallel_config": {"data_parallel_size": 1}}
    instances = []

    def __init__(self, server_url, server_timeout=240.0):
        self.calls = []
        RecordingVLLMClient.instances.append(self)

    def wait_for_server_ready(self, *args, **kwargs):
        self.calls.append(("ready",))

    def get_server_info(self):
        return self.server_info

    def pause(self):
        self.calls.append(("pause",))

    def resume(self):
        self.calls.append(("resume",))

    def load_lora_adapter(self, lora_name, lora_path, timeout=1800):
        self.calls.append(("load", lora_name, lora_path))

    def unload_lora_adapter(self, lora_name, timeout=1800):
        self.calls.append(("unload", lora_name))


class IdleRolloutWorker:
    """TRL accepts an injected rollout worker (``rollout_worker=``); this one produces nothing."""

    rollout_buffer = None

    def start(self):
        pass

    def stop(self):
        pass

    def update_model_version(self, version):
        self.version = version


@pytest.fixture
def async_env(tmp_path, monkeypatch):
    monkeypatch.setattr(agt, "VLLMClient", RecordingVLLMClient)
    monkeypatch.setattr(agt, "get_peak_flops_per_device", lambda *a, **k: 1e12)  # CUDA-only probe
    model_dir = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    return tmp_path, str(model_dir)


def async_trainer(env, peft_config, cls=OffPrincipalAsyncGRPOTrainer):
    tmp_path, model_dir = env
    args = agt.AsyncGRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], max_steps=1,
                               per_device_train_batch_size=4, num_generations=4, gradient_checkpointing=False)
    return cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=prompts(),
               processing_class=make_tokenizer(), peft_config=peft_config, rollout_worker=IdleRolloutWorker())


def served_deltas(folder):
    """ΔW per module of the LoRA folder vLLM is asked to load, as vLLM computes it: lora_B @ lora_A · alpha/r."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    return config, {m: (tensors[f"{m}.lora_B.weight"] @ tensors[f"{m}.lora_A.weight"]) * scaling for m in modules}


def test_async_grpo_publishes_the_adapter_as_the_lora_it_equals(async_env, one_thread):
    trainer = async_trainer(async_env, OffPrincipalConfig(r=8, top_k=8, target_modules="all-linear"))
    assert trainer._lora_sync  # TRL's own select_adapter_sync accepted the adapter for LoRA sync
    client = RecordingVLLMClient.instances[-1]
    model = trainer.accelerator.unwrap_model(trainer.model)
    for version in (1, 2):
        randomize_b(model, seed=version)
        trainer._sync_weight()
        loads = [c for c in client.calls if c[0] == "load"]
        assert loads[-1][1] == f"trl-policy-v{version}"
        folder = __import__("pathlib").Path(loads[-1][2])
        config, deltas = served_deltas(folder)
        assert config["peft_type"] == "LORA" and not config.get("modules_to_save")
        assert config["lora_alpha"] == config["r"] == 8
        ours = {n.removeprefix("base_model.model."): m for n, m in layers(model).items()}
        assert {m.removeprefix("base_model.model.") for m in deltas} == set(ours)
        for name, layer in ours.items():
            expected = layer.get_delta_weight("default")
            error = (deltas[f"base_model.model.{name}"] - expected).norm() / expected.norm()
            assert error <= 1e-6, (name, float(error))
    assert trainer.model is not None and not isinstance(trainer.model, LoraSyncView)  # the trained model is back
    # and PEFT loads the served folder as a plain LoRA: the same outputs as the base with the adapter's ΔW added
    # (the trainer's own model runs TRL's tree attention, which needs packed inputs, so it is not run here)
    lora = PeftModel.from_pretrained(make_tiny_model("llama"), str(folder))
    reference = make_tiny_model("llama")
    with torch.no_grad():
        for name, layer in ours.items():
            reference.get_submodule(name).weight.add_(layer.get_delta_weight("default"))
        batch = tiny_batch()
        torch.testing.assert_close(lora(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)


def test_async_grpo_rank_above_the_servers_is_refused_with_trls_message(async_env):
    with pytest.raises(ValueError, match="--max-lora-rank 32"):
        async_trainer(async_env, OffPrincipalConfig(r=20, top_k=4, target_modules=["q_proj", "v_proj"]))


def test_a_rank_above_vllms_largest_is_refused_with_trls_message(async_env):
    view = LoraSyncView(get_peft_model(make_tiny_model("llama"), OffPrincipalConfig(r=600, top_k=4,
                                                                                   target_modules=["q_proj"])), "default")
    info = {**RecordingVLLMClient.server_info, "lora_config": {"max_lora_rank": 512, "max_loras": 8}}
    args = agt.AsyncGRPOConfig(output_dir=str(async_env[0]), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="larger than the largest rank vLLM can serve"):
        agt.select_adapter_sync(info, view, args)


def test_async_grpo_modules_to_save_falls_back_to_merged_sync(async_env):
    """TRL's validation applies to the exported LoRA: modules_to_save cannot ride in a vLLM LoRA, so the stock
    fallback (merged weights, the adapter's exact merge) is chosen."""
    view = LoraSyncView(
        get_peft_model(make_tiny_model("llama"), OffPrincipalConfig(r=8, top_k=8, target_modules=["q_proj"],
                                                                    modules_to_save=["lm_head"])),
        "default",
    )
    info = RecordingVLLMClient.server_info
    assert agt.select_adapter_sync(info, view, agt.AsyncGRPOConfig(output_dir=str(async_env[0]), use_cpu=True, bf16=False, report_to=[])) is False


def test_the_stock_trainer_with_a_lora_adapter_is_unchanged(async_env, one_thread):
    trainer = async_trainer(async_env, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert trainer._lora_sync
    trainer._sync_weight()
    load = [c for c in RecordingVLLMClient.instances[-1].calls if c[0] == "load"][-1]
    tensors = load_file(f"{load[2]}/adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)


# ------------------------------------------------------------ the README's scale-out recipe


def test_accelerate_configs_are_trls_fsdp2_and_zero3_recipes():
    import yaml
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    fsdp = yaml.safe_load((folder / "fsdp2.yaml").read_text())
    zero = yaml.safe_load((folder / "zero3.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True  # the case the adapter must survive
    assert zero["distributed_type"] == "DEEPSPEED" and zero["deepspeed_config"]["zero_stage"] == 3
    assert fsdp["mixed_precision"] == zero["mixed_precision"] == "bf16"


def test_the_accelerate_example_trains_a_step_without_vllm(tmp_path, monkeypatch, one_thread):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "grpo_offprincipal.py"
    spec = importlib.util.spec_from_file_location("grpo_offprincipal", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_dir = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    example.main(["--model", str(model_dir), "--vllm-mode", "none", "--max-steps", "1", "--r", "4", "--top-k", "4",
                  "--max-completion-length", "8", "--output-dir", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFFPRINCIPAL"
