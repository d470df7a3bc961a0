"""Which grammar engine to constrain decoding with: xgrammar and llguidance side by side, on one thread.

For each schema: the time to compile it (xgrammar compiles a grammar ahead; llguidance builds its matcher
lazily), then the time per generated token to compute the token mask and advance the matcher, while the
shipped language model generates greedily under the mask. Both engines see the same logits each step, so
they produce the same tokens; the answer is checked to parse and validate. The results, and the choice
they made, are in benchmarks/NOTES.md ("Constrained decoding").

    .venv/bin/pip install xgrammar==0.2.8   # not a dependency: only this comparison uses it
    .venv/bin/python -m benchmarks.grammar_engines
"""

import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import jsonschema  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SCHEMAS = {
    "json_object": {"type": "object"},
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
            "landmarks": {
                "type": "array",
                "minItems": 2,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
                    "required": ["name", "year"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["city", "country", "landmarks"],
        "additionalProperties": False,
    },
    # What a hostile caller might send: a pattern whose automaton is large, repeated many times.
    "hostile": {  # xgrammar took 252 s to compile this here; llguidance 5 ms
        "type": "object",
        "properties": {
            f"f{i}": {"type": "string", "pattern": "^(?:[a-z]{1,40}[0-9]{0,40}-){1,60}$", "maxLength": 4000}
            for i in range(50)
        },
        "required": [f"f{i}" for i in range(50)],
    },
}
PROMPT = "Describe Paris as JSON."
TOKENS = 60


class Xgrammar:
    name = "xgrammar 0.2.8"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, self.info.vocab_size)

    def compile(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def mask(self, matcher, logits):
        matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def accept(self, matcher, token):
        matcher.accept_token(token)
        return matcher.is_terminated()


class Llguidance:
    name = "llguidance 1.9.1"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.words = (vocab_size + 31) // 32
        self.buffer = np.empty(self.words, dtype=np.int32)

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def mask(self, matcher, logits):
        matcher.unsafe_compute_mask_ptr(self.buffer.ctypes.data, self.buffer.nbytes)
        allowed = np.unpackbits(self.buffer.view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(bool)
        logits[0, torch.from_numpy(~allowed)] = float("-inf")

    def accept(self, matcher, token):
        matcher.consume_token(token)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return matcher.is_stopped()


def main() -> None:
    torch.set_num_threads(1)
    from deployments.llm import LanguageConfig, LanguageModel

    model = LanguageModel(LanguageConfig())
    vocab = model.model.config.vocab_size
    prompt = model.chat_prompt([{"role": "user", "content": PROMPT}])
    for engine_type in (Xgrammar, Llguidance):
        start = time.perf_counter()
        engine = engine_type(model.tokenizer, vocab)
        print(
            f"\n{engine.name}: tokenizer prepared in {(time.perf_counter() - start) * 1000:.0f} ms (once per replica)"
        )
        for name, schema in SCHEMAS.items():
            start = time.perf_counter()
            matcher = engine.compile(schema)
            compile_ms = (time.perf_counter() - start) * 1000
            ids, masks, past = list(prompt), [], None
            inputs = torch.tensor([ids])
            generated = []
            with torch.inference_mode():
                for _ in range(TOKENS):
                    out = model.model(inputs, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    logits = out.logits[:, -1, :].float().clone()
                    start = time.perf_counter()
                    engine.mask(matcher, logits)
                    token = int(logits.argmax())
                    done = engine.accept(matcher, token)
                    masks.append((time.perf_counter() - start) * 1000)
                    if token in model.stop_token_ids:
                        break
                    generated.append(token)
                    if done:
                        break
                    inputs = torch.tensor([[token]])
            text = model.decode(generated)
            try:
                jsonschema.validate(json.loads(text), schema)
                valid = "valid"
            except (ValueError, jsonschema.ValidationError):
                valid = "cut short" if len(generated) >= TOKENS - 1 else "INVALID"
            print(
                f"  {name:12s} compile {compile_ms:7.1f} ms  mask+advance per token: median "
                f"{statistics.median(masks):.3f} ms, max {max(masks):.3f} ms over {len(masks)} tokens  ({valid})"
            )


if __name__ == "__main__":
    main()
