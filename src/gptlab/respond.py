"""Answering instructions with a model, in the prompt style it was fine-tuned with.

    model_prompt_style  the style stored in a run's config.json (or the default, or an override)
    respond_one         one record's answer: generated after the style's prompt, cut at a new turn
    respond             every record of a list with its answer added, for ``gptlab judge`` to score
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from gptlab.config import InstructSettings
from gptlab.generate import generate_text
from gptlab.instruction_data import RESPONSE_KEY
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle, get_prompt_style
from gptlab.run import source_metadata
from gptlab.tokenizer import Tokenizer

__all__ = ["RESPONSE_KEY", "model_prompt_style", "respond", "respond_one"]

log = logging.getLogger("gptlab")

DEFAULT_STYLE = InstructSettings.prompt_style


def model_prompt_style(source: str | Path, override: str | None = None) -> PromptStyle:
    """The style a model was fine-tuned with (its run's config.json), unless ``override`` names one."""
    if override:
        return get_prompt_style(override)
    return get_prompt_style(source_metadata(source).get("prompt_style") or DEFAULT_STYLE)


def respond_one(model: GPTModel, tokenizer: Tokenizer, style: PromptStyle, record: dict,
                max_new_tokens: int = 256, stop: Sequence[str] = (), **sampling) -> str:
    """The model's answer to one record: generated after the style's prompt, cut at a new turn (or ``stop``)."""
    prompt = style.prompt(record["instruction"], record.get("input") or "")
    text = generate_text(model, tokenizer, prompt, max_new_tokens, stop=(*style.stop, *stop), **sampling)
    return style.extract_response(text)


def respond(model: GPTModel, tokenizer: Tokenizer, style: PromptStyle, records: Sequence[dict],
            key: str = RESPONSE_KEY, max_new_tokens: int = 256, progress: bool = True, **sampling) -> list[dict]:
    """Each record with the model's answer added under ``key``."""
    context = model.config.context_length
    answered = []
    for i, record in enumerate(tqdm(records, desc="responding", unit="record", disable=not progress,
                                    dynamic_ncols=True)):
        n_prompt = len(tokenizer.encode(style.prompt(record["instruction"], record.get("input") or "")))
        if n_prompt >= context:
            log.warning("record %d: the prompt is %d tokens, longer than the context of %d; the model sees "
                        "only its last %d tokens", i, n_prompt, context, context - 1)
        answered.append({**record, key: respond_one(model, tokenizer, style, record, max_new_tokens, **sampling)})
    return answered
