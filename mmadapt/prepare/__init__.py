"""Model preparation: commands that write a new base LLM rather than train an adapter.

- :mod:`.lord` (``mmadapt decompose``): LoRD, linear layers replaced by two low-rank factors.
- :mod:`.loraprune` (``mmadapt prune``): LoRAPrune, attention groups and MLP channels
  scored by LoRA gradients, masked on a cubic schedule, then cut out.
- :mod:`.folder`: the prepared-model folder a preset loads as ``llm: {source: prepared, path: DIR}``.
- :mod:`.text`, :mod:`.pipeline`: the held-out / calibration text sets and the shared
  load -> measure -> change -> measure -> write flow.

Nothing is imported here: ``mmadapt.llm`` imports :mod:`.folder`, which must not pull in
the modules that import ``mmadapt.llm`` back.
"""
