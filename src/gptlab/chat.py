"""Interactive multi-turn chat with an instruction-tuned model, in its prompt style, streaming.

The conversation is re-laid out by the style for every turn; when it no longer fits the context
window (minus room for the answer) the oldest exchanges are dropped. Ctrl-C while the model writes
stops the answer and returns to the prompt; Ctrl-C or Ctrl-D at the prompt ends the chat.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from gptlab.errors import GptlabError
from gptlab.generate import stream_text
from gptlab.model import GPTModel
from gptlab.prompts import PromptStyle
from gptlab.tokenizer import Tokenizer

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


def fit_conversation(style: PromptStyle, tokenizer: Tokenizer, messages: list[dict], budget: int,
                     system: str | None = None) -> tuple[str, int]:
    """The prompt for ``messages`` in at most ``budget`` tokens, dropping the oldest exchanges as needed.

    Returns ``(prompt, dropped)``, where ``dropped`` counts the messages left out (they are also removed
    from ``messages``, so later turns do not pay for them again). The last user message always stays.
    """
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        prompt = style.chat(head + messages)
        n_tokens = len(tokenizer.encode(prompt))
        if n_tokens <= budget:
            return prompt, dropped
        if len(messages) <= 1:
            raise GptlabError(f"the message is {n_tokens} tokens with the prompt layout; it must fit in {budget} "
                              "(the context minus room for the answer); shorten it or lower --max-new-tokens")
        # drop the oldest user message and the answer to it
        cut = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
        del messages[:cut]
        dropped += cut


def chat(model: GPTModel, tokenizer: Tokenizer, style: PromptStyle, system: str | None = None,
         max_new_tokens: int = 256, stop: Sequence[str] = (), read: Callable[[str], str] = input,
         out: TextIO | None = None, **sampling) -> list[dict]:
    """Run the read-answer loop until /exit, end of input or Ctrl-C at the prompt; returns the conversation.

    ``stop`` adds stop strings to the style's; ``sampling`` goes to ``stream_text`` (temperature, top_k, ...).
    ``out`` defaults to the ``sys.stdout`` of the moment of the call, not of the import.
    """
    out = out or sys.stdout
    context = model.config.context_length
    budget = context - min(max_new_tokens, context // 2)  # the answer keeps at least half the window
    messages: list[dict] = []
    out.write(f"chatting in the {style.name} prompt style; {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages.clear()
            out.write("(conversation forgotten)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": text})
        try:
            prompt, dropped = fit_conversation(style, tokenizer, messages, budget, system)
        except GptlabError as e:
            messages.pop()
            out.write(f"error: {e}\n")
            continue
        if dropped:
            out.write(f"(the {dropped} oldest message(s) no longer fit the context of {context} tokens)\n")
        pieces: list[str] = []
        try:
            for piece in stream_text(model, tokenizer, prompt, max_new_tokens, stop=(*style.stop, *stop), **sampling):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
