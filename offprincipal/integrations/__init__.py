"""Where OffPrincipal meets a training engine: one module per engine.

- :mod:`.fsdp`: FSDP2 (``fully_shard``): DTensor factors, bases computed on rank 0 from real weights and broadcast
  to ranks holding meta or placeholder weights;
- :mod:`.deepspeed`: DeepSpeed ZeRO-2/3: weights gathered for the SVD and the fingerprint, fp32 bases;
- :mod:`.trl`: TRL's weight sync to vLLM: the exact low-memory merge, the adapter-only LoRA export.

Nothing here is imported by ``import offprincipal`` unless the engine is in use; the tuner and the optimizers call
in through small hooks, so engine-specific code has one home per engine.
"""
