"""Prompt styles: how an instruction (and a conversation) is laid out as text for the model.

Fine-tuning, ``respond``, ``chat`` and the server all format through one ``PromptStyle``, looked up by
name, so a model is always prompted the way it was trained. Adding a style is one entry in ``PROMPT_STYLES``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class PromptStyle:
    name: str
    preamble: str  # text before the first turn
    user: str  # header of a user turn (the instruction)
    input: str  # header of the optional input that follows the instruction
    assistant: str  # header of the response; the model writes after it
    stop: tuple[str, ...]  # text that means the model has begun a new turn
    turn_sep: str  # between an answer and the next user turn

    def task(self, instruction: str, input: str = "") -> str:
        """The preamble, the instruction and the optional input: the prompt without its response header."""
        text = self.preamble + self.user + instruction
        if input:
            text += self.input + input
        return text

    def prompt(self, instruction: str, input: str = "") -> str:
        """The text up to and including the response header."""
        return self.task(instruction, input) + self.assistant

    def example(self, instruction: str, input: str, output: str) -> str:
        """A whole training example: prompt followed by the reference response."""
        return self.prompt(instruction, input) + output

    def chat(self, messages: Sequence[dict]) -> str:
        """A conversation (``[{"role": "user"|"assistant"|"system", "content": ...}, ...]``) ending at the
        response header, so the model answers the last user message. A system message replaces the preamble."""
        text, previous = self.preamble, None
        for message in messages:
            role, content = message.get("role"), message.get("content", "")
            if role == "system":
                text = content + ("\n\n" if content and self.preamble.endswith("\n\n") else "")
            elif role == "user":
                text += (self.turn_sep if previous == "assistant" else "") + self.user + content
            elif role == "assistant":
                text += self.assistant + content
            else:
                raise GptlabError(f"unknown chat role {role!r}; use system, user or assistant")
            previous = role
        if previous != "user":
            raise GptlabError("a chat prompt must end with a user message")
        return text + self.assistant

    def extract_response(self, generated: str) -> str:
        """The model's answer from text generated after ``prompt()``: cut at the first new turn, trimmed."""
        cut = min((i for i in (generated.find(s) for s in self.stop) if i >= 0), default=len(generated))
        return generated[:cut].strip()


ALPACA = PromptStyle(
    name="alpaca",
    preamble="Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
    user="### Instruction:\n",
    input="\n\n### Input:\n",
    assistant="\n\n### Response:\n",
    stop=("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:", "### Instruction:", "### Response:"),
    turn_sep="\n\n",
)

# The Phi-3 layout used in the LLMs-from-scratch book's chapter 7 exercise.
PHI3 = PromptStyle(
    name="phi3",
    preamble="",
    user="<|user|>\n",
    input="\n",
    assistant="\n<|assistant|>:\n",
    stop=("<|user|>", "<|assistant|>", "<|end|>"),
    turn_sep="\n",
)

PROMPT_STYLES: dict[str, PromptStyle] = {style.name: style for style in (ALPACA, PHI3)}


def get_prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise GptlabError(f"unknown prompt style {name!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]
