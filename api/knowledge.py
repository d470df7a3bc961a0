"""What every protocol returns about knowledge and policies: the facts an answer was grounded in (with their
sources) and a policy's decision, rendered from the dataplane's results. The native and OpenAI routers share
these shapes."""

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from knowledge.graph import Fact
from knowledge.rules import Decision
from pipelines.grounding import render_fact


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class KnowledgeSource(_Response):
    synset: str = Field(description="The WordNet synset the fact is about: its id, e.g. n02123159.")
    name: str = Field(description="The synset's name, e.g. tiger_cat.n.02.")
    definition: str = Field(description="WordNet's definition (gloss).")
    kind_of: list[str] = Field(description="What it is a kind of, nearest first.")
    fact: str = Field(description="The fact exactly as the language model read it.")


class FiredRule(_Response):
    rule: str = Field(description="The rule's id.")
    action: Literal["flag", "block", "annotate", "route", "mask"]
    priority: int
    facts: dict[str, Any] = Field(description="The facts its condition read, as they were (long values cut).")
    route: str | None = Field(None, description="Where a `route` rule sends the request.")
    message: str | None = None


class PolicyDecision(_Response):
    policy: str
    decision: Literal["allow"] = Field(description="A blocked request gets 403 instead of an answer.")
    route: str | None = Field(None, description="Where the request should go next (the first `route` rule's).")
    flags: list[str] = Field(description="The ids of the `flag` rules that fired.")
    annotations: list[dict[str, str]] = Field(description="`{rule, message}` of the `annotate` rules that fired.")
    masked: int = Field(description="How many matches of `mask` rules were replaced by [masked] in the answer.")
    fired: list[FiredRule] = Field(description="Every rule that fired, in the order run (highest priority first).")
    errors: list[dict[str, str]] = Field(description="Rules that could not be evaluated (`{rule, error}`): not fired.")
    evaluated: int = Field(description="How many rules ran.")
    seconds: float = Field(description="Time the rules took.")


def render_decision(decision: Decision, masked: int) -> PolicyDecision:
    return PolicyDecision(
        policy=decision.policy,
        decision="allow",
        route=decision.route,
        flags=decision.flags,
        annotations=decision.annotations,
        masked=masked,
        fired=[FiredRule(**dataclasses.asdict(fired)) for fired in decision.fired],
        errors=decision.errors,
        evaluated=decision.evaluated,
        seconds=round(decision.seconds, 6),
    )


def render_sources(facts: list[Fact]) -> list[KnowledgeSource]:
    return [
        KnowledgeSource(
            synset=fact.synset.id, name=fact.synset.name, definition=fact.synset.definition,
            kind_of=list(fact.kind_of), fact=render_fact(fact),
        )
        for fact in facts
    ]  # fmt: skip
