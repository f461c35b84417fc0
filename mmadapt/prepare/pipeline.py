"""What ``mmadapt prune`` and ``mmadapt decompose`` share: load a preset's LLM, measure it,
change it, measure it again and write the prepared folder (see :mod:`.folder`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import ModelPreset, load_preset
from ..errors import InputError
from ..llm import LLMConfig, base_fingerprint, load_llm
from .folder import module_spec, read_meta, write_folder
from .text import perplexity, read_texts

# Changes the model in place and returns the modules it replaced, by name.
Transform = Callable[[PreTrainedModel, PreTrainedTokenizerBase], dict[str, nn.Linear]]


def check_new_folder(out: str | Path) -> Path:
    """``--out`` as a path that does not exist yet."""
    out = Path(out)
    if out.exists():
        raise InputError(f"--out {out} already exists; give a new folder")
    return out


def prepare(
    preset_name: str,
    out: Path,
    method: str,
    settings: dict,
    check: Callable[[PreTrainedModel], object],
    transform: Transform,
    heldout: str,
    seed: int = 0,
) -> dict:
    """Load ``preset_name``'s LLM, apply ``transform``, and write the result to ``out``.

    Args:
        method: ``loraprune`` or ``lord``, recorded with ``settings`` in ``prepared.json``.
        check: raises :class:`InputError` if ``transform`` cannot apply to the model; runs
            before the first perplexity pass, so bad settings fail fast.
        heldout: the JSONL text set scored before and after.
        seed: seeds a ``source=random`` LLM's weights, as ``train.seed`` does.

    Returns:
        The ``prepared.json`` content: parameter counts, perplexities, changed modules.
    """
    out = check_new_folder(out)
    preset = load_preset(preset_name)
    texts = read_texts(heldout, "--heldout")
    loaded = load_llm(preset.llm, seed=seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    check(model)
    source = {"preset": preset_name, "llm": preset.llm.model_dump(mode="json"), "fingerprint": base_fingerprint(model)}
    before = _measure(model, tokenizer, texts)
    replaced = transform(model, tokenizer)
    after = _measure(model, tokenizer, texts)
    meta = {
        "method": method,
        "settings": settings,
        "source": source,
        "fingerprint": base_fingerprint(model),
        "parameters": {"before": before[0], "after": after[0]},
        "perplexity": {"text": str(heldout), "tokens": before[2], "before": before[1], "after": after[1]},
        "modules": _source_modules(preset.llm) | {name: module_spec(m) for name, m in replaced.items()},
    }
    llm = LLMConfig(
        source="prepared",
        path=str(out.resolve()),
        attn_implementation=preset.llm.attn_implementation,
        trust_remote_code=preset.llm.trust_remote_code,
    )
    write_folder(out, model, tokenizer, meta, lambda folder: _write_preset(folder, preset, llm, method, preset_name))
    return meta


def _source_modules(llm: LLMConfig) -> dict[str, dict]:
    """The modules a prepared source already changed (preparing a prepared model, e.g. prune then decompose)."""
    return read_meta(Path(llm.path))["modules"] if llm.source == "prepared" else {}


def _measure(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[int, float, int]:
    """(parameter count, held-out perplexity, scored tokens)."""
    score, tokens = perplexity(model, tokenizer, texts)
    return sum(p.numel() for p in model.parameters()), score, tokens


def _write_preset(folder: Path, preset: ModelPreset, llm: LLMConfig, method: str, source: str) -> None:
    """``preset.yaml``: the source preset with this folder as its LLM."""
    prepared = preset.model_copy(update={"llm": llm})
    header = (
        f"# {source} with its LLM replaced by the {method} model in this folder (written by mmadapt).\n"
        f"#   python train.py --config configs/xcomposer.yaml model={llm.path}/preset.yaml\n"
    )
    body = yaml.safe_dump(prepared.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    (folder / "preset.yaml").write_text(header + body)


def summary(meta: dict, out: Path) -> str:
    """The lines a command prints after writing ``out``."""
    params, ppl = meta["parameters"], meta["perplexity"]
    change = params["after"] / params["before"] - 1
    return "\n".join([
        f"parameters: {params['before']:,} -> {params['after']:,} ({change:+.1%})",
        f"perplexity on {ppl['text']} ({ppl['tokens']} tokens): {ppl['before']:.3f} -> {ppl['after']:.3f}",
        f"{len(meta['modules'])} modules changed; wrote {out}",
        f"use it: model={out}/preset.yaml, or a preset's llm: {{source: prepared, path: {out.resolve()}}}",
    ])
