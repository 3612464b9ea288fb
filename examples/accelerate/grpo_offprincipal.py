"""GRPO with an OffPrincipal adapter in TRL, as run under accelerate (FSDP2 or ZeRO-3) with vLLM.

    # vLLM in the training processes (colocate):
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/grpo_offprincipal.py \
        --model Qwen/Qwen2.5-1.5B-Instruct --vllm-mode colocate
    # vLLM as a server on its own GPU(s) (start it first; here GPU 0 serves, GPUs 1-7 train):
    CUDA_VISIBLE_DEVICES=0 trl vllm-serve --model Qwen/Qwen2.5-1.5B-Instruct
    CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 accelerate launch --config_file examples/accelerate/zero3.yaml \
        --num_processes 7 examples/accelerate/grpo_offprincipal.py --model Qwen/Qwen2.5-1.5B-Instruct --vllm-mode server

The task is the built-in arithmetic one (reward: the final number is right); swap in your own dataset and reward.
Each weight sync is TRL's merged path: the adapter merges exactly and unmerges the base bit for bit, holding a
small correction instead of a copy of each weight (README, "Scale-out"). ``--vllm-mode none`` generates with
transformers (no vLLM).
"""

from __future__ import annotations

import argparse

import torch
from trl import GRPOConfig, GRPOTrainer

from offprincipal import OffPrincipalConfig
from offprincipal.experiment.tasks import ArithmeticTask


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--vllm-mode", choices=["colocate", "server", "none"], default="colocate")
    parser.add_argument("--output-dir", default="runs/grpo-offprincipal")
    parser.add_argument("--r", type=int, default=16, help="adapter rank (served by vLLM as a LoRA of this rank)")
    parser.add_argument("--top-k", type=int, default=32, help="principal directions kept frozen per weight")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--max-completion-length", type=int, default=128)
    args = parser.parse_args(argv)

    task = ArithmeticTask()
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=2e-4, bf16=torch.cuda.is_available(),
        per_device_train_batch_size=8, num_generations=8, max_completion_length=args.max_completion_length, logging_steps=1,
        gradient_checkpointing=True, use_vllm=args.vllm_mode != "none",
        vllm_mode=args.vllm_mode if args.vllm_mode != "none" else "colocate",
        reward_weights=task.reward_weights,
    )
    trainer = GRPOTrainer(
        model=args.model, reward_funcs=task.reward_funcs, args=config, train_dataset=task.dataset("train"),
        peft_config=OffPrincipalConfig(r=args.r, top_k=args.top_k, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
